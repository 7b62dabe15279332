module podcache.dev/podcache

go 1.19
