module pyheadscale.test/gocheck

go 1.26.6

require tailscale.com v1.80.3

require (
	github.com/go-json-experiment/json v0.0.0-20250103232110-6a9a0fde9288 // indirect
	go4.org/mem v0.0.0-20240501181205-ae6ca9944745 // indirect
	golang.org/x/crypto v0.33.0 // indirect
	golang.org/x/net v0.35.0 // indirect
	golang.org/x/sys v0.30.0 // indirect
)
