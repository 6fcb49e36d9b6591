"""The short-lived modes (--check, --ready, --teardown, --print-corefile, PID 1): cheap to import."""
