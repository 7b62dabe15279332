package testnode

import "syscall"

// procAttr kills a node when the test binary dies, even by SIGKILL, so no
// node outlives its test.
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
