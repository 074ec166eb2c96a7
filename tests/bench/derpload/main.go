// Command derpload offers a paced packet load to a DERP relay and measures what comes out.
//
// It opens -pairs client pairs (A sends, B receives) over TLS to -url with Tailscale's own
// DERP client (tailscale.com/derp), then reads one JSON command per line on stdin:
//
//	{"rate": 200000, "warm": 3, "measure": 15}
//
// and runs one point: every A sends 1,300-byte packets to its B on an open-loop schedule
// (aggregate `rate` packets/s, split evenly over the pairs), each packet carrying its
// sequence number and send time. B records the one-way latency of every packet sent in the
// measured window (after `warm` seconds, for `measure` seconds); a packet that has not
// arrived -losswait after the window is lost. Output is JSON lines on stdout: the events
// {"event":"measure_start"} and {"event":"measure_end"} at the window's edges (the driver
// samples the relay's CPU then), then {"event":"result", ...}. EOF on stdin ends the
// program; so does -deadline.
//
// A sender that falls behind its schedule (its socket is full because the relay does not
// read) skips the backlog beyond -maxburst packets, as tailscaled drops DERP writes when its
// queue is full; skipped packets are reported, not counted as lost.
//
// Loopback only: the benchmark points it at a relay on 127.0.0.1 with a self-signed
// certificate, so certificate checks are off.
package main

import (
	"bufio"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime/pprof"
	"sync"
	"syscall"
	"time"

	"tailscale.com/derp"
	"tailscale.com/types/key"
)

var base = time.Now()

// nowNs is monotonic nanoseconds since start; senders and receivers share this process.
func nowNs() int64 { return int64(time.Since(base)) }

// ---- latency histogram: 1 µs buckets up to 131 ms, then 1 ms buckets up to 60 s ----------

const (
	fineBuckets   = 1 << 17
	coarseBuckets = 60000
)

type hist struct {
	fine   []uint32
	coarse []uint32
	n      uint64
}

func newHist() *hist {
	return &hist{fine: make([]uint32, fineBuckets), coarse: make([]uint32, coarseBuckets)}
}

func (h *hist) add(ns int64) {
	us := ns / 1000
	if us < 0 {
		us = 0
	}
	if us < fineBuckets {
		h.fine[us]++
	} else {
		ms := us / 1000
		if ms >= coarseBuckets {
			ms = coarseBuckets - 1
		}
		h.coarse[ms]++
	}
	h.n++
}

func (h *hist) merge(o *hist) {
	for i, v := range o.fine {
		h.fine[i] += v
	}
	for i, v := range o.coarse {
		h.coarse[i] += v
	}
	h.n += o.n
}

// quantile returns the q-quantile in milliseconds (upper edge of its bucket), or -1 if empty.
func (h *hist) quantile(q float64) float64 {
	if h.n == 0 {
		return -1
	}
	rank := uint64(q*float64(h.n-1)) + 1
	var seen uint64
	for i, v := range h.fine {
		seen += uint64(v)
		if seen >= rank {
			return float64(i+1) / 1000
		}
	}
	for i, v := range h.coarse {
		seen += uint64(v)
		if seen >= rank {
			return float64(i + 1)
		}
	}
	return float64(coarseBuckets)
}

// ---- connections --------------------------------------------------------------------------

// gateWriter sits under the derp.Client's bufio.Writer. derp.Client.Send flushes after
// every packet; while `hold` is set those flushes collect here and go out as one socket
// write per pacing tick (-coalesce), otherwise each packet is its own write.
type gateWriter struct {
	conn net.Conn
	buf  []byte
	hold bool
}

func (g *gateWriter) Write(p []byte) (int, error) {
	if !g.hold {
		return g.conn.Write(p)
	}
	g.buf = append(g.buf, p...)
	return len(p), nil
}

func (g *gateWriter) release() error {
	g.hold = false
	if len(g.buf) == 0 {
		return nil
	}
	_, err := g.conn.Write(g.buf)
	g.buf = g.buf[:0]
	return err
}

type client struct {
	c    *derp.Client
	conn net.Conn
	gate *gateWriter
	pub  key.NodePublic
}

func dial(u *url.URL, timeout time.Duration) (*client, error) {
	host := u.Host
	tcp, err := net.DialTimeout("tcp", host, timeout)
	if err != nil {
		return nil, err
	}
	var conn net.Conn = tcp
	if u.Scheme == "https" {
		tc := tls.Client(tcp, &tls.Config{InsecureSkipVerify: true, ServerName: u.Hostname()})
		tc.SetDeadline(time.Now().Add(timeout))
		if err := tc.Handshake(); err != nil {
			tcp.Close()
			return nil, fmt.Errorf("tls: %w", err)
		}
		conn = tc
	}
	conn.SetDeadline(time.Now().Add(timeout))
	gate := &gateWriter{conn: conn}
	brw := bufio.NewReadWriter(bufio.NewReaderSize(conn, 64<<10), bufio.NewWriterSize(gate, 64<<10))
	req, err := http.NewRequest("GET", u.String(), nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	req.Header.Set("Upgrade", "DERP")
	req.Header.Set("Connection", "Upgrade")
	if err := req.Write(brw); err != nil {
		conn.Close()
		return nil, err
	}
	if err := brw.Flush(); err != nil {
		conn.Close()
		return nil, err
	}
	resp, err := http.ReadResponse(brw.Reader, req)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("upgrade: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		conn.Close()
		return nil, fmt.Errorf("upgrade: HTTP %s", resp.Status)
	}
	priv := key.NewNode()
	dc, err := derp.NewClient(priv, conn, brw, func(string, ...any) {}, derp.CanAckPings(true))
	if err != nil {
		conn.Close()
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	return &client{c: dc, conn: conn, gate: gate, pub: priv.Public()}, nil
}

// ---- receive side -------------------------------------------------------------------------

type receiver struct {
	mu     sync.Mutex
	w0, w1 int64 // measured window, in send-time ns
	n      uint64
	h      *hist
	err    error
}

func (r *receiver) reset(w0, w1 int64) {
	r.mu.Lock()
	r.w0, r.w1, r.n, r.h = w0, w1, 0, newHist()
	r.mu.Unlock()
}

func (r *receiver) loop(c *client) {
	for {
		m, err := c.c.Recv()
		if err != nil {
			r.mu.Lock()
			r.err = err
			r.mu.Unlock()
			return
		}
		switch m := m.(type) {
		case derp.ReceivedPacket:
			if len(m.Data) < 17 {
				continue
			}
			now := nowNs()
			ts := int64(binary.BigEndian.Uint64(m.Data[9:17]))
			r.mu.Lock()
			if ts >= r.w0 && ts < r.w1 {
				r.n++
				r.h.add(now - ts)
			}
			r.mu.Unlock()
		case derp.PingMessage:
			c.c.SendPong(m)
		}
	}
}

// ---- send side ----------------------------------------------------------------------------

type pair struct {
	a, b *client
	rx   *receiver
}

type sendStats struct {
	sent, sentWindow, skipped int64
	err                       error
}

// pace sends on the schedule "packet k is due at start + k/ratePair" until w1, waking every
// tick (about `perTick` packets, 100 µs .. 10 ms). Pairs get different `start` phases so their
// bursts do not line up.
func (p *pair) pace(ratePair float64, start, w0, w1 int64, size, perTick, maxBurst int, coalesce bool) sendStats {
	var st sendStats
	buf := make([]byte, size)
	rand.Read(buf)
	buf[0] = 0x04 // a WireGuard data message: never looks like disco
	tick := time.Duration(float64(time.Second) * float64(perTick) / ratePair)
	tick = max(100*time.Microsecond, min(tick, 10*time.Millisecond))
	var seq int64 // packets scheduled so far
	if d := start - nowNs(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	for {
		now := nowNs()
		if now >= w1 {
			return st
		}
		due := int64(float64(now-start)*ratePair/1e9) + 1 - seq
		if due > int64(maxBurst) {
			st.skipped += due - int64(maxBurst)
			seq += due - int64(maxBurst)
			due = int64(maxBurst)
		}
		if due > 0 {
			p.a.gate.hold = coalesce
			for k := int64(0); k < due; k++ {
				ts := nowNs()
				binary.BigEndian.PutUint64(buf[1:9], uint64(seq))
				binary.BigEndian.PutUint64(buf[9:17], uint64(ts))
				if err := p.a.c.Send(p.b.pub, buf); err != nil {
					st.err = err
					return st
				}
				seq++
				st.sent++
				if ts >= w0 && ts < w1 {
					st.sentWindow++
				}
			}
			if err := p.a.gate.release(); err != nil {
				st.err = err
				return st
			}
		}
		time.Sleep(tick)
	}
}

// ---- points -------------------------------------------------------------------------------

type command struct {
	Rate    float64 `json:"rate"`
	Warm    float64 `json:"warm"`
	Measure float64 `json:"measure"`
}

type result struct {
	Event        string  `json:"event"`
	OfferedPPS   float64 `json:"offered_pps"`
	SentPPS      float64 `json:"sent_pps"`
	DeliveredPPS float64 `json:"delivered_pps"`
	SentWindow   int64   `json:"sent_in_window"`
	Received     uint64  `json:"received_in_window"`
	Loss         float64 `json:"loss"`
	Skipped      int64   `json:"skipped"`
	P50ms        float64 `json:"p50_ms"`
	P90ms        float64 `json:"p90_ms"`
	P99ms        float64 `json:"p99_ms"`
	P999ms       float64 `json:"p999_ms"`
	MaxMs        float64 `json:"max_ms"`
	GenCPUs      float64 `json:"gen_cpu_s"`
	Error        string  `json:"error,omitempty"`
}

var outMu sync.Mutex

func emit(v any) {
	b, _ := json.Marshal(v)
	outMu.Lock()
	os.Stdout.Write(append(b, '\n'))
	outMu.Unlock()
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func sleepUntil(t int64) {
	if d := t - nowNs(); d > 0 {
		time.Sleep(time.Duration(d))
	}
}

func runPoint(pairs []*pair, cmd command, size, perTick, maxBurst int, coalesce bool, lossWait time.Duration) result {
	ratePair := cmd.Rate / float64(len(pairs))
	start := nowNs() + int64(100*time.Millisecond)
	w0 := start + int64(cmd.Warm*1e9)
	w1 := w0 + int64(cmd.Measure*1e9)
	for _, p := range pairs {
		p.rx.reset(w0, w1)
	}
	stats := make([]sendStats, len(pairs))
	var wg sync.WaitGroup
	for i, p := range pairs {
		wg.Add(1)
		phase := int64(float64(i) / float64(len(pairs)) * float64(perTick) / ratePair * 1e9)
		go func() {
			defer wg.Done()
			stats[i] = p.pace(ratePair, start+phase, w0, w1, size, perTick, maxBurst, coalesce)
		}()
	}
	sleepUntil(w0)
	cpu0 := cpuSeconds()
	emit(map[string]string{"event": "measure_start"})
	sleepUntil(w1)
	cpu1 := cpuSeconds()
	emit(map[string]string{"event": "measure_end"})
	wg.Wait()
	time.Sleep(lossWait)

	res := result{Event: "result", OfferedPPS: cmd.Rate, GenCPUs: cpu1 - cpu0}
	h := newHist()
	var errs []error
	for i, p := range pairs {
		res.SentWindow += stats[i].sentWindow
		res.Skipped += stats[i].skipped
		if stats[i].err != nil {
			errs = append(errs, stats[i].err)
		}
		p.rx.mu.Lock()
		res.Received += p.rx.n
		h.merge(p.rx.h)
		if p.rx.err != nil {
			errs = append(errs, p.rx.err)
		}
		p.rx.w0, p.rx.w1 = 0, 0
		p.rx.mu.Unlock()
	}
	res.SentPPS = float64(res.SentWindow) / cmd.Measure
	res.DeliveredPPS = float64(res.Received) / cmd.Measure
	if res.SentWindow > 0 {
		res.Loss = 1 - float64(res.Received)/float64(res.SentWindow)
	}
	res.P50ms, res.P90ms = h.quantile(0.50), h.quantile(0.90)
	res.P99ms, res.P999ms, res.MaxMs = h.quantile(0.99), h.quantile(0.999), h.quantile(1)
	if len(errs) > 0 {
		res.Error = errors.Join(errs...).Error()
	}
	return res
}

// warmUp sends one packet per pair and waits until each has arrived.
func warmUp(pairs []*pair, size int) error {
	for _, p := range pairs {
		p.rx.reset(0, 1<<62)
	}
	buf := make([]byte, size)
	buf[0] = 0x04
	for _, p := range pairs {
		binary.BigEndian.PutUint64(buf[9:17], uint64(nowNs()))
		if err := p.a.c.Send(p.b.pub, buf); err != nil {
			return err
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, p := range pairs {
		for {
			p.rx.mu.Lock()
			n, err := p.rx.n, p.rx.err
			p.rx.mu.Unlock()
			if err != nil {
				return err
			}
			if n > 0 {
				break
			}
			if time.Now().After(deadline) {
				return errors.New("a warm-up packet did not arrive within 10 s")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

func main() {
	rawURL := flag.String("url", "", "relay URL, e.g. https://127.0.0.1:3340/derp")
	npairs := flag.Int("pairs", 10, "client pairs")
	size := flag.Int("size", 1300, "packet size in bytes (>= 17)")
	perTick := flag.Int("pertick", 4, "packets per sender per pacing tick at the nominal rate")
	maxBurst := flag.Int("maxburst", 16, "most packets a sender writes per pacing tick")
	coalesce := flag.Bool("coalesce", true, "one socket write per sender per tick (false: one per packet)")
	lossWait := flag.Duration("losswait", time.Second, "a packet not seen this long after the window is lost")
	deadline := flag.Duration("deadline", 2*time.Hour, "exit after this long whatever happens")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the points to this file")
	flag.Parse()
	u, err := url.Parse(*rawURL)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		fmt.Fprintln(os.Stderr, "derpload: -url must be http(s)://host:port/derp")
		os.Exit(2)
	}
	if *size < 17 || *size > derp.MaxPacketSize || *npairs < 1 || *perTick < 1 || *maxBurst < *perTick {
		fmt.Fprintln(os.Stderr, "derpload: bad -size, -pairs, -pertick or -maxburst")
		os.Exit(2)
	}
	time.AfterFunc(*deadline, func() {
		fmt.Fprintln(os.Stderr, "derpload: deadline reached")
		os.Exit(3)
	})

	pairs := make([]*pair, *npairs)
	for i := range pairs {
		a, err := dial(u, 30*time.Second)
		if err == nil {
			var b *client
			b, err = dial(u, 30*time.Second)
			if err == nil {
				pairs[i] = &pair{a: a, b: b, rx: &receiver{h: newHist()}}
				go pairs[i].rx.loop(b)
				// A only sends; drain whatever the relay says to it (keep-alives).
				go (&receiver{h: newHist()}).loop(a)
			}
		}
		if err != nil {
			emit(map[string]string{"event": "error", "error": "connect: " + err.Error()})
			os.Exit(1)
		}
	}
	if err := warmUp(pairs, *size); err != nil {
		emit(map[string]string{"event": "error", "error": "warm-up: " + err.Error()})
		os.Exit(1)
	}
	emit(map[string]any{"event": "ready", "pairs": *npairs})

	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "derpload: cpuprofile:", err)
			os.Exit(2)
		}
		defer pprof.StopCPUProfile()
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var cmd command
		if err := json.Unmarshal(sc.Bytes(), &cmd); err != nil || cmd.Rate <= 0 || cmd.Measure <= 0 || cmd.Warm < 0 {
			emit(map[string]string{"event": "error", "error": "bad command: " + sc.Text()})
			continue
		}
		emit(runPoint(pairs, cmd, *size, *perTick, *maxBurst, *coalesce, *lossWait))
	}
	for _, p := range pairs {
		p.a.conn.Close()
		p.b.conn.Close()
	}
}
