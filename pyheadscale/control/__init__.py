"""The control protocol: /key and /ts2021 upgrade, HTTP/2 over Noise, and its handlers."""
