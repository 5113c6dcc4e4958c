// bench/peers/go/echo/echo_server.go
//
// The Go peer of the TCP echo comparison (bench/compare_echo.sh): one
// goroutine per connection, each reading into its own 4 KiB buffer (the same
// size as bench/thread_echo_server.cc) and writing back what it read, and
// dropping a peer that sends nothing, or reads nothing, for --idle seconds
// (30), as examples/echo_server does: each read and each write has a
// deadline, so all three servers pay for an idle timer per request. Go's netpoller does what weft's io driver
// does, so weft's CPU per request and memory per idle connection are read
// as ratios to this server's.
//
// Usage: GOMAXPROCS=1 echo_server --port N [--idle S]   (listens on 127.0.0.1 only)
//
// It uses the standard library only, so it builds offline:
//
//	GOFLAGS=-mod=mod GOPROXY=off go build
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"time"
)

const bufferBytes = 4096

// idleTimeout is the deadline of every read and write (set once, in main).
var idleTimeout = 30 * time.Second

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1")
	idle := flag.Int("idle", 30, "seconds without a request before a peer is dropped")
	flag.Parse()
	if *port <= 0 || *port > 65535 || *idle <= 0 {
		fmt.Fprintln(os.Stderr, "usage: echo_server --port N [--idle S]")
		os.Exit(2)
	}
	idleTimeout = time.Duration(*idle) * time.Second
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		log.Fatalf("echo_server: %v", err)
	}
	acceptLoop(ln)
}

// acceptLoop starts one goroutine per connection. Running out of descriptors
// drops that connection (reported once), not the server.
func acceptLoop(ln net.Listener) {
	reported := false
	for {
		c, err := ln.Accept()
		if err != nil {
			if !reported {
				log.Printf("echo_server: accept: %v", err)
				reported = true
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go serve(c)
	}
}

func serve(c net.Conn) {
	defer c.Close()
	buf := make([]byte, bufferBytes)
	for {
		// Read and write: a peer that sends but never reads is dropped too.
		if err := c.SetDeadline(time.Now().Add(idleTimeout)); err != nil {
			return
		}
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
