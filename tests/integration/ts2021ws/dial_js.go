//go:build js

package main

import (
	"context"
	"net/url"

	"tailscale.com/control/controlhttp"
	"tailscale.com/types/key"
)

// dial runs tailscale.com's js/wasm control dial: a WebSocket to wss://<host>/ts2021 (the
// js dialer only uses a custom port for ws://), through the JavaScript WebSocket.
func dial(ctx context.Context, server string, ck key.MachinePublic, _ string, version uint16) (int, error) {
	u, err := url.Parse(server)
	if err != nil {
		return 0, err
	}
	d := &controlhttp.Dialer{
		Hostname:        u.Hostname(),
		HTTPPort:        "80",
		HTTPSPort:       "443",
		MachineKey:      key.NewMachine(),
		ControlKey:      ck,
		ProtocolVersion: version,
	}
	conn, err := d.Dial(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	return int(conn.ProtocolVersion()), nil
}
