#!/usr/bin/env python3
"""Clients for bench/abuse.sh.

  abuse_clients.py idle h1|h2|h1tls PORT COUNT READY_FILE
      opens COUNT connections (TLS for h1tls and h2, ALPN h2 for h2) from
      127.0.0.2-17, sends one request on each, reads its answer, then keeps
      every connection open and silent; writes READY_FILE once all are open,
      and holds until killed.
  abuse_clients.py backend PORT BODY_BYTES
      an HTTP/1.1 keep-alive backend answering every request with BODY_BYTES
      bytes, writing as fast as its client reads (slow readers stay slow).
  abuse_clients.py probe PORT HOST SECONDS
      one keep-alive HTTPS client, a request every 50 ms for SECONDS or until
      SIGTERM; prints "requests failures p50_ms p99_ms max_ms" (a failure is
      an error or non-200).
"""
import asyncio, http.client, signal, socket, ssl, sys, time

_contexts = {}

def tls_context(alpn):
    # One per protocol: building a context loads the system CA bundle (about
    # 0.1 s), which made opening 10,000 connections take longer than the
    # proxy's handshake timeout.
    if alpn not in _contexts:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols([alpn])
        _contexts[alpn] = ctx
    return _contexts[alpn]

def hpack_literal(index, value):
    return bytes([index, len(value)]) + value

def h2_request(host):
    block = b"\x82\x87\x84" + hpack_literal(1, host) + bytes([0x0F, 43, 4]) + b"idle"
    frame = lambda kind, flags, stream, payload: (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload)
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(4, 1, 0, b"")
            + frame(1, 0x5, 1, block))

async def one_idle(kind, port, host, held, source):
    ssl_ctx = None if kind == "h1" else tls_context("h2" if kind == "h2" else "http/1.1")
    # Several source addresses: 10,000 connections from one would crowd its ports.
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                                   server_hostname=host if ssl_ctx else None,
                                                   local_addr=(source, 0))
    if kind == "h2":
        writer.write(h2_request(host.encode()))
    else:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: idle\r\n\r\n".encode())
    await writer.drain()
    try:
        await asyncio.wait_for(reader.read(4096), 10)
    except asyncio.TimeoutError:
        pass
    held.append((reader, writer))

async def idle(kind, port, count, ready):
    # 50 handshakes at a time: more only queue in this one Python thread,
    # and on a loaded box some then outlast the proxy's handshake timeout.
    held, sem = [], asyncio.Semaphore(50)
    async def guarded(i):
        async with sem:
            try:
                await one_idle(kind, port, "load.toolforge.org", held, f"127.0.0.{2 + i % 16}")
            except Exception as e:  # counted: only the open ones are held
                print(f"connection failed: {e!r}", file=sys.stderr)
    async def progress():
        while True:
            with open(ready + ".count", "w") as f:
                f.write(f"{len(held)}\n")
            await asyncio.sleep(1)
    counter = asyncio.create_task(progress())
    await asyncio.gather(*(guarded(i) for i in range(count)))
    counter.cancel()
    with open(ready, "w") as f:
        f.write(f"{len(held)}\n")
    await asyncio.sleep(3600)

async def backend(port, size):
    body = b"x" * size
    head = (f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    async def serve(reader, writer):
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in request.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                writer.write(head)
                view = memoryview(body)
                for at in range(0, size, 65536):
                    writer.write(view[at:at + 65536])
                    await writer.drain()
        except Exception:
            pass
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()

def probe(port, host, seconds):
    latencies, failures, conn = [], 0, None
    end = time.monotonic() + seconds
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while time.monotonic() < end and not stop:
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=tls_context("http/1.1"))
            conn.request("GET", "/probe", headers={"Host": host, "User-Agent": "probe"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures += 1
        except Exception:
            failures += 1
            conn = None
        latencies.append((time.monotonic() - start) * 1000)
        time.sleep(max(0, 0.05 - (time.monotonic() - start)))
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(f"{len(latencies)} {failures} {pick(0.5):.1f} {pick(0.99):.1f} {latencies[-1]:.1f}")

if __name__ == "__main__":
    if sys.argv[1] == "backend":
        asyncio.run(backend(int(sys.argv[2]), int(sys.argv[3])))
    elif sys.argv[1] == "idle":
        asyncio.run(idle(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    else:
        probe(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
