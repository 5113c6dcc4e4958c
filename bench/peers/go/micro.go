// bench/peers/go/micro.go
//
// The Go peer of //bench:micro: the same micro workloads, written with
// goroutines, channels and sync, so that bench/compare_micro.sh can put a
// weft figure and a Go figure measured in the same run side by side.
// It guards nothing by itself; it is the reference point the weft numbers
// are read against (see *Benchmarks* in /work/shared/CONVENTIONS.md).
//
// Usage:
//
//	micro <workload> [N]
//
// prints exactly one line on stdout:
//
//	workload=<w> n=<N> value=<v> unit=<u>
//
// where n is the count the value is divided by (goroutines, yields, round
// trips, messages, lock/unlock pairs; for skynet the number of leaves).
// The optional N replaces the default size for smoke tests: spawn_join,
// idle_memory and pingpong take it as the total; yield as the yields per
// goroutine; fanin as the messages per producer; mutex as the iterations per
// goroutine; skynet ignores it.
//
// Exit status: 0 on success, 1 when a workload's self-check fails, 2 on a
// usage error (unknown workload, bad N). GOMAXPROCS is left at its default,
// the number of CPUs (as weft's worker count), except in yield, which runs
// on one P as weft's runs on one worker.
package main

import (
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A workload runs with size n (0 means its default) and returns the count
// the value is divided by, the value and its unit.
type workload func(n int) (count int, value float64, unit string)

var workloads = map[string]workload{
	"spawn_join":  spawnJoin,
	"skynet":      skynet,
	"yield":       yield,
	"idle_memory": idleMemory,
	"pingpong":    pingpong,
	"fanin":       fanin,
	"mutex":       mutex,
}

func main() {
	if len(os.Args) < 2 || len(os.Args) > 3 {
		usage("expected a workload name and an optional N")
	}
	name := os.Args[1]
	run, ok := workloads[name]
	if !ok {
		usage("unknown workload " + strconv.Quote(name))
	}
	n := 0
	if len(os.Args) == 3 {
		v, err := strconv.Atoi(os.Args[2])
		if err != nil || v <= 0 {
			usage("N must be a positive integer, got " + strconv.Quote(os.Args[2]))
		}
		n = v
	}
	count, value, unit := run(n)
	fmt.Printf("workload=%s n=%d value=%.2f unit=%s\n", name, count, value, unit)
}

func usage(msg string) {
	names := make([]string, 0, len(workloads))
	for k := range workloads {
		names = append(names, k)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "micro: %s\nusage: micro <%s> [N]\n", msg, strings.Join(names, "|"))
	os.Exit(2)
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "micro: "+format+"\n", args...)
	os.Exit(1)
}

func orDefault(n, def int) int {
	if n == 0 {
		return def
	}
	return n
}

func nsPer(d time.Duration, ops int) float64 {
	return float64(d.Nanoseconds()) / float64(ops)
}

// spawnJoin: n goroutines each increment one atomic; wait for all.
func spawnJoin(n int) (int, float64, string) {
	n = orDefault(n, 1_000_000)
	var counter atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	wg.Add(n)
	for i := 0; i < n; i++ {
		go func() {
			counter.Add(1)
			wg.Done()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if got := counter.Load(); got != int64(n) {
		fail("spawn_join: counter = %d, want %d", got, n)
	}
	return n, nsPer(elapsed, n), "ns/fiber"
}

// skynet: the classic skynet benchmark, a 10-ary tree of goroutines with
// 1,000,000 leaves, each parent summing its children over an unbuffered
// channel.
func skynet(_ int) (int, float64, string) {
	const leaves, div = 1_000_000, 10
	const want = leaves * (leaves - 1) / 2 // 499999500000
	c := make(chan int)
	start := time.Now()
	go skynetNode(c, 0, leaves, div)
	sum := <-c
	elapsed := time.Since(start)
	if sum != want {
		fail("skynet: sum = %d, want %d", sum, want)
	}
	return leaves, float64(elapsed.Nanoseconds()) / 1e6, "ms"
}

func skynetNode(c chan<- int, num, size, div int) {
	if size == 1 {
		c <- num
		return
	}
	rc := make(chan int)
	for i := 0; i < div; i++ {
		go skynetNode(rc, num+i*(size/div), size/div, div)
	}
	sum := 0
	for i := 0; i < div; i++ {
		sum += <-rc
	}
	c <- sum
}

// yield: two goroutines each call runtime.Gosched() n times, with
// GOMAXPROCS=1 (weft: one worker), so that every yield switches to the
// other goroutine. On more Ps each goroutine would have one to itself, and
// weft's yield with nothing else runnable does not switch at all.
func yield(n int) (int, float64, string) {
	n = orDefault(n, 5_000_000)
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	const goroutines = 2
	var wg sync.WaitGroup
	start := time.Now()
	wg.Add(goroutines)
	for g := 0; g < goroutines; g++ {
		go func() {
			for i := 0; i < n; i++ {
				runtime.Gosched()
			}
			wg.Done()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	return goroutines * n, nsPer(elapsed, goroutines*n), "ns/yield"
}

// idleMemory: RSS growth per parked goroutine. Each goroutine signals that
// it is about to park, then blocks receiving on one shared channel; the
// channel is closed once the measurement is taken.
func idleMemory(n int) (int, float64, string) {
	n = orDefault(n, 1_000_000)
	runtime.GC()
	before := rssBytes()

	gate := make(chan struct{})
	var parked, exited sync.WaitGroup
	parked.Add(n)
	exited.Add(n)
	for i := 0; i < n; i++ {
		go func() {
			parked.Done()
			<-gate
			exited.Done()
		}()
	}
	parked.Wait()
	runtime.GC()
	time.Sleep(200 * time.Millisecond) // settle: the last goroutines reach <-gate
	after := rssBytes()

	close(gate)
	exited.Wait()
	return n, float64(after-before) / float64(n), "bytes/fiber"
}

// rssBytes reads the resident set size from /proc/self/statm (second field,
// in pages).
func rssBytes() int64 {
	data, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		fail("idle_memory: %v", err)
	}
	fields := strings.Fields(string(data))
	if len(fields) < 2 {
		fail("idle_memory: unexpected /proc/self/statm: %q", data)
	}
	pages, err := strconv.ParseInt(fields[1], 10, 64)
	if err != nil {
		fail("idle_memory: %v", err)
	}
	return pages * int64(os.Getpagesize())
}

// pingpong: two goroutines pass a token back and forth over two unbuffered
// channels, n round trips.
func pingpong(n int) (int, float64, string) {
	n = orDefault(n, 1_000_000)
	ping, pong := make(chan int), make(chan int)
	var wg sync.WaitGroup
	var final int
	start := time.Now()
	wg.Add(2)
	go func() { // pinger
		token := 0
		for i := 0; i < n; i++ {
			ping <- token
			token = <-pong
		}
		final = token
		wg.Done()
	}()
	go func() { // ponger
		for i := 0; i < n; i++ {
			pong <- <-ping + 1
		}
		wg.Done()
	}()
	wg.Wait()
	elapsed := time.Since(start)
	if final != n {
		fail("pingpong: token = %d, want %d", final, n)
	}
	return n, nsPer(elapsed, n), "ns/roundtrip"
}

// fanin: two producers send n ints each into one channel of capacity 1024;
// one consumer receives them all.
func fanin(n int) (int, float64, string) {
	n = orDefault(n, 5_000_000)
	const producers, capacity = 2, 1024
	total := producers * n
	ch := make(chan int, capacity)
	done := make(chan int)
	start := time.Now()
	for p := 0; p < producers; p++ {
		go func() {
			for i := 0; i < n; i++ {
				ch <- i
			}
		}()
	}
	go func() { // consumer
		sum := 0
		for i := 0; i < total; i++ {
			sum += <-ch
		}
		done <- sum
	}()
	sum := <-done
	elapsed := time.Since(start)
	if want := producers * (n * (n - 1) / 2); sum != want {
		fail("fanin: sum = %d, want %d", sum, want)
	}
	return total, float64(total) / elapsed.Seconds() / 1e6, "Mmsg/s"
}

// mutex: 1,000 goroutines each take one shared sync.Mutex n times to
// increment a shared counter.
func mutex(n int) (int, float64, string) {
	n = orDefault(n, 10_000)
	const goroutines = 1_000
	total := goroutines * n
	var mu sync.Mutex
	counter := 0
	var wg sync.WaitGroup
	start := time.Now()
	wg.Add(goroutines)
	for g := 0; g < goroutines; g++ {
		go func() {
			for i := 0; i < n; i++ {
				mu.Lock()
				counter++
				mu.Unlock()
			}
			wg.Done()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if counter != total {
		fail("mutex: counter = %d, want %d", counter, total)
	}
	return total, nsPer(elapsed, total), "ns/lock"
}
