//go:build !js

package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"os"

	"github.com/coder/websocket"
	"tailscale.com/control/controlbase"
	"tailscale.com/control/controlhttp/controlhttpcommon"
	"tailscale.com/net/wsconn"
	"tailscale.com/types/key"
)

// dial sends GET /ts2021 as a WebSocket upgrade (subprotocol tailscale-control-protocol)
// with the first handshake message in the query, as controlhttp's js dialer does.
func dial(ctx context.Context, server string, ck key.MachinePublic, caFile string, version uint16) (int, error) {
	u, err := url.Parse(server)
	if err != nil {
		return 0, err
	}
	hc := &http.Client{}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return 0, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return 0, fmt.Errorf("no certificate in %s", caFile)
		}
		hc.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	}
	init, cont, err := controlbase.ClientDeferred(key.NewMachine(), ck, version)
	if err != nil {
		return 0, err
	}
	scheme := "ws"
	if u.Scheme == "https" {
		scheme = "wss"
	}
	wsURL := &url.URL{Scheme: scheme, Host: u.Host, Path: "/ts2021", RawQuery: url.Values{
		controlhttpcommon.HandshakeHeaderName: []string{base64.StdEncoding.EncodeToString(init)},
	}.Encode()}
	ws, resp, err := websocket.Dial(ctx, wsURL.String(), &websocket.DialOptions{
		Subprotocols: []string{controlhttpcommon.UpgradeHeaderValue},
		HTTPClient:   hc,
	})
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	if err != nil {
		return 0, err
	}
	nc := wsconn.NetConn(ctx, ws, websocket.MessageBinary, wsURL.String())
	conn, err := cont(ctx, nc)
	if err != nil {
		nc.Close()
		return 0, fmt.Errorf("noise handshake: %w", err)
	}
	defer conn.Close()
	return int(conn.ProtocolVersion()), nil
}
