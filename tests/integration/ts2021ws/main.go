// Command ts2021ws opens Tailscale's control channel (/ts2021) over a WebSocket, as the
// browser/WASM client does, and completes the Noise handshake with the control server.
//
// Built natively it dials with the same primitives the WASM client uses (coder/websocket and
// tailscale.com's controlbase); built for GOOS=js it runs tailscale.com's own js/wasm control
// dial (controlhttp.Dialer), which only speaks WebSocket. Either way it prints
// "TS2021_WS_OK protocol=<n>" once the handshake is done, or an error and exits 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

func main() {
	server := flag.String("server", "", "control server URL, e.g. https://198.51.100.1")
	controlKey := flag.String("key", "", "the server's Noise public key (mkey:...), from /key")
	caFile := flag.String("ca", "", "PEM file of the CA that signed the server's certificate (native build)")
	flag.Parse()
	var ck key.MachinePublic
	if err := ck.UnmarshalText([]byte(*controlKey)); err != nil || ck.IsZero() {
		fmt.Fprintf(os.Stderr, "bad -key %q: %v\n", *controlKey, err)
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	version, err := dial(ctx, *server, ck, *caFile, uint16(tailcfg.CurrentCapabilityVersion))
	if err != nil {
		fmt.Fprintf(os.Stderr, "ts2021 over websocket: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("TS2021_WS_OK protocol=%d\n", version)
}
