#!/usr/bin/python3
"""One ssh login for the end-to-end tests: publickey (if a key is given), then
keyboard-interactive answering every prompt with the next code from --codes, then --command
(`id -un`) with --stdin on its standard input.
Prints one JSON line: {"ok": bool, "prompts": [...], "output": str, "error": str}."""
import argparse
import json
import socket

import paramiko

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--source", help="local address to connect from")
p.add_argument("--port", type=int, required=True)
p.add_argument("--user", required=True)
p.add_argument("--key")
p.add_argument("--codes", default="")
p.add_argument("--timeout", type=float, default=20)
p.add_argument("--command", default="id -un")
p.add_argument("--stdin", default="")
a = p.parse_args()

codes = [c for c in a.codes.split(",") if c]
prompts = []


def handler(title, instructions, fields):
    answers = []
    for text, _echo in fields:
        prompts.append(text)
        answers.append(codes.pop(0) if codes else "")
    return answers


result = {"ok": False, "prompts": prompts, "output": "", "error": ""}
source = (a.source, 0) if a.source else None
sock = socket.create_connection((a.host, a.port), timeout=a.timeout, source_address=source)
t = paramiko.Transport(sock)
try:
    t.banner_timeout = a.timeout
    t.auth_timeout = a.timeout
    t.start_client(timeout=a.timeout)
    if a.key:
        key = paramiko.Ed25519Key.from_private_key_file(a.key)
        t.auth_publickey(a.user, key)
    if not t.is_authenticated():
        t.auth_interactive(a.user, handler)
    chan = t.open_session(timeout=a.timeout)
    chan.settimeout(a.timeout)
    chan.exec_command(a.command)
    if a.stdin:
        chan.sendall(a.stdin.encode())
    chan.shutdown_write()
    out = b""
    while True:
        data = chan.recv(4096)
        if not data:
            break
        out += data
    result["ok"] = chan.recv_exit_status() == 0
    result["output"] = out.decode().strip()
    err = b""
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(4096)
    result["error"] = err.decode().strip()
except Exception as e:  # noqa: BLE001 - report any failure as data
    result["error"] = f"{type(e).__name__}: {e}"
finally:
    t.close()
print(json.dumps(result))
