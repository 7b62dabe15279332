//go:build !linux

package testnode

import "syscall"

func procAttr() *syscall.SysProcAttr { return nil }
