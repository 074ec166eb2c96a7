// gocheck decodes JSON documents into Tailscale's own tailcfg types with encoding/json, the
// decoder official clients use, and prints whether each decoded and what it re-encodes to.
// The Python tests use it as the judge of what Go accepts (tests/gocheck/oracle.py).
//
// Input: one JSON object per line, {"kind": "...", "data": <document>}.
// Output: one JSON object per line, {"ok": bool, "err": "...", "out": <re-encoded value>}.
package main

import (
	"bufio"
	"encoding/json"
	"os"

	"tailscale.com/tailcfg"
)

type request struct {
	Kind string          `json:"kind"`
	Data json.RawMessage `json:"data"`
}

type result struct {
	OK  bool            `json:"ok"`
	Err string          `json:"err,omitempty"`
	Out json.RawMessage `json:"out,omitempty"`
}

func target(kind string) any {
	switch kind {
	case "hostinfo":
		return new(tailcfg.Hostinfo)
	case "maprequest":
		return new(tailcfg.MapRequest)
	case "registerrequest":
		return new(tailcfg.RegisterRequest)
	case "node":
		return new(tailcfg.Node)
	case "mapresponse":
		return new(tailcfg.MapResponse)
	}
	return nil
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 0, 1<<20), 8<<20)
	w := bufio.NewWriter(os.Stdout)
	enc := json.NewEncoder(w)
	for in.Scan() {
		var req request
		var res result
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			res.Err = "bad request line: " + err.Error()
		} else if v := target(req.Kind); v == nil {
			res.Err = "unknown kind " + req.Kind
		} else if err := json.Unmarshal(req.Data, v); err != nil {
			res.Err = err.Error()
		} else if out, err := json.Marshal(v); err != nil {
			res.Err = "re-encoding: " + err.Error()
		} else {
			res.OK, res.Out = true, out
		}
		if err := enc.Encode(res); err != nil {
			os.Exit(1)
		}
		w.Flush()
	}
}
