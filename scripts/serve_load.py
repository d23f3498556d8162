"""Load test of ``ca2vdm serve``: N concurrent WebSocket viewers for T seconds against one server on
loopback (a script, not a timed test: it needs a quiet machine to mean anything).

    .venv/bin/python scripts/serve_load.py                       # 8 viewers, 60 s, digits-fast
    .venv/bin/python scripts/serve_load.py --clients 8 --seconds 10 --json outputs/serve_load.json
    .venv/bin/python scripts/serve_load.py --url http://127.0.0.1:8000   # an already running server
    .venv/bin/python scripts/serve_load.py --clients 3 --seconds 40 --hostile   # and one hostile client

Without ``--url`` it starts ``ca2vdm serve`` in a subprocess on a free loopback port with
``--max-sessions`` = the number of viewers (+1 with ``--hostile``) and per-client limits that let
them all in (they share one address), so the RSS that ``GET /api/status`` reports is the server's
alone.

It reports, per stream: frames/s over the steady part (after the first chunk), how
steady it is (the coefficient of variation of frames per second, the longest gap between chunks),
the errors; the server's RSS at second 20 and at the end, and how much its peak RSS rose between
them (goal: growth of either <= 20 MB, <= 100 MB with ``--hostile``; a run shorter than 60 s
samples at a third of its length instead of 20) and whether the session count returns
to 0 once the viewers leave. Exit status 1 when a goal is missed.

``--hostile`` adds one hostile client (issue 22 §3) that, once the early RSS sample is taken, repeats
until the end: 300 ``set_prompt`` at once on its own stream (300 different prompts, after 3 chunks), a 6000x6000 PNG (~117 KiB), a start
with seed 10**400, a message one byte over the upload limit, a handshake from a foreign Origin. It
reports what each attack got back (an answer, a close with its code, a refused handshake) and the
goal "every hostile message answered or closed"; the viewers' longest gap shows what it cost them.
"""

import argparse
import asyncio
import collections
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MAX_CLIENTS, MAX_SECONDS = 32, 600   # bounds: this is a loopback load test, not a stress tool
RSS_GROWTH_GOAL_MB = 20.0
HOSTILE_RSS_GROWTH_GOAL_MB = 100.0   # issue 22 §3
HEADER_BYTES = 16


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/api/status", timeout=10) as r:
        return json.loads(r.read())


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:  # a free port (released just before the server binds it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    streams = args.clients + bool(args.hostile)  # every client is 127.0.0.1: one address for the per-client limits
    cmd = [sys.executable, "-m", "ca2vdm.cli", "serve", "--port", str(port), "--max-sessions", str(streams),
           "--max-streams-per-client", str(streams), "--max-connections-per-client", str(streams + 3)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--fps", str(args.fps)] if args.fps else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, t = f"http://127.0.0.1:{port}", time.monotonic()
    while True:
        try:
            status(url)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() - t > 180:
                proc.kill()
                raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.25)


async def viewer(url: str, i: int, args, until: float, out: dict) -> None:
    """One viewer: start a stream (prompt and seed its own), read every chunk until ``until``."""
    from websockets.asyncio.client import connect

    rec = out[i] = {"arrivals": [], "frames": [], "errors": [], "t_start": time.monotonic()}
    digit = i % 10
    start = {"type": "start", "model": args.model, "prompt": f"a {digit} moving down and right", "seed": i}
    try:
        async with connect(url.replace("http", "ws", 1) + "/ws", max_size=None, open_timeout=30) as ws:
            await ws.send(json.dumps(start))
            while (left := until - time.monotonic()) > 0:
                try:
                    m = await asyncio.wait_for(ws.recv(), timeout=left)
                except asyncio.TimeoutError:
                    break
                if isinstance(m, bytes):
                    rec["arrivals"].append(time.monotonic())
                    rec["frames"].append(int.from_bytes(m[:4], "little"))
                else:
                    msg = json.loads(m)
                    if msg["type"] == "error":
                        rec["errors"].append(msg["message"])
    except Exception as e:  # a refused or broken connection counts as an error of this stream
        rec["errors"].append(f"{type(e).__name__}: {e}")


def bomb_png() -> bytes:
    """A single-colour 6000x6000 PNG: ~117 KiB that decode to 103 MiB of RGB."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


async def answers(ws, wanted: int, timeout: float) -> collections.Counter:
    """Read up to ``wanted`` JSON answers (chunks skipped): {"prompt": n, "error": n, ..., "closed CODE":
    the messages left unanswered when the server closed, "no answer": left when ``timeout`` ran out}."""
    from websockets.exceptions import ConnectionClosed

    got, end = collections.Counter(), time.monotonic() + timeout
    try:
        while sum(got.values()) < wanted:
            m = await asyncio.wait_for(ws.recv(), timeout=max(0.01, end - time.monotonic()))
            if isinstance(m, str):
                got[json.loads(m)["type"]] += 1
    except ConnectionClosed as e:
        got[f"closed {e.rcvd.code if e.rcvd else 'without a close frame'}"] += wanted - sum(got.values())
    except asyncio.TimeoutError:
        got["no answer"] += wanted - sum(got.values())
    return got


async def hostile(url: str, args, go: asyncio.Event, until: float, out: dict) -> None:
    """One hostile client: the attacks of issue 22 §3 in rounds, from ``go`` until ``until``;
    ``out[attack]`` counts what each message got back."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    ws_url, png, timeout = url.replace("http", "ws", 1) + "/ws", bomb_png(), 60.0
    out.update(rounds=0, flood=collections.Counter(), bomb=collections.Counter(), seed=collections.Counter(),
               oversize=collections.Counter(), origin=collections.Counter())
    await go.wait()
    while time.monotonic() < until - 2:
        async with connect(ws_url, max_size=None, open_timeout=30) as ws:  # 300 switches on its own stream
            await ws.send(json.dumps({"type": "start", "model": args.model, "prompt": "a 1 moving up", "seed": 3}))
            out["flood"].update(await answers(ws, 1, timeout) - collections.Counter(started=1))
            for _ in range(3):  # its window full of frames first: each switch is then a full re-cache
                while isinstance(await asyncio.wait_for(ws.recv(), timeout), str):
                    pass
            for k in range(300):
                await ws.send(json.dumps({"type": "set_prompt", "prompt": f"a {k % 10} moving left, take {k}"}))
            out["flood"].update(await answers(ws, 300, timeout))
        async with connect(ws_url, max_size=None, open_timeout=30) as ws:  # the bomb, then the huge seed
            await ws.send(png)
            out["bomb"].update(await answers(ws, 1, timeout))
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "start", "model": args.model, "prompt": "a 1", "seed": 10 ** 400}))
            out["seed"].update(await answers(ws, 1, timeout))
        async with connect(ws_url, max_size=None, open_timeout=30) as ws:  # one byte over the limit
            with contextlib.suppress(ConnectionClosed):
                await ws.send(b"\0" * (8 * 2 ** 20 + 1))
            out["oversize"].update(await answers(ws, 1, timeout))
        try:  # a page of another site
            async with connect(ws_url, origin="http://evil.example", open_timeout=30):
                out["origin"]["accepted"] += 1
        except InvalidStatus as e:
            out["origin"][f"refused {e.response.status_code}"] += 1
        out["rounds"] += 1
        await asyncio.sleep(2)


def summarise(rec: dict) -> dict:
    arrivals, frames = rec["arrivals"], rec["frames"]
    if len(arrivals) < 2:
        return {"fps": 0.0, "cv": None, "max_gap_s": None, "chunks": len(arrivals), "errors": rec["errors"]}
    end = arrivals[-1]
    t0 = arrivals[0]  # steady part: after the first chunk (the prompt encoder, the first forward)
    fps = sum(frames[1:]) / (arrivals[-1] - t0)
    per_second = [0] * max(1, int(end - t0))
    for t, f in zip(arrivals[1:], frames[1:]):
        per_second[min(len(per_second) - 1, int(t - t0))] += f
    mean = statistics.fmean(per_second)
    cv = statistics.pstdev(per_second) / mean if mean else None
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"fps": fps, "cv": cv, "max_gap_s": max(gaps), "chunks": len(arrivals), "errors": rec["errors"],
            "first_chunk_s": t0 - rec["t_start"]}


async def run(url: str, args) -> dict:
    t0 = time.monotonic()
    until = t0 + args.seconds
    early = 20.0 if args.seconds >= 60 else args.seconds / 3  # or later: see below
    out, attacks, go = {}, {}, asyncio.Event()
    tasks = [asyncio.create_task(viewer(url, i, args, until, out)) for i in range(args.clients)]
    if args.hostile:
        tasks.append(asyncio.create_task(hostile(url, args, go, until, attacks)))
    await asyncio.sleep(early)
    while not all(out.get(i, {}).get("arrivals") for i in range(args.clients)) and time.monotonic() < until - 1:
        await asyncio.sleep(0.1)  # the early sample after every stream's first chunk (all models and encoders loaded)
    early = time.monotonic() - t0
    first = await asyncio.to_thread(status, url)
    rss_early, peak_early = first["rss_mb"], first.get("rss_peak_mb")  # an older server reports no peak
    go.set()  # the hostile client starts after the early sample
    mid = await asyncio.to_thread(status, url)
    await asyncio.gather(*tasks)
    end = await asyncio.to_thread(status, url)
    rss_end, peak_end = end["rss_mb"], end.get("rss_peak_mb")
    t = time.monotonic()
    while (s := await asyncio.to_thread(status, url))["sessions"] and time.monotonic() - t < 10:
        await asyncio.sleep(0.1)
    return {"streams": [summarise(out[i]) for i in range(args.clients)], "sessions_during": mid["sessions"],
            "hostile": {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in attacks.items()},
            "rss_mb": {f"at {early:.1f} s": rss_early, f"at {args.seconds:g} s": rss_end},
            "rss_growth_mb": rss_end - rss_early, "sessions_after": s["sessions"],
            "rss_peak_growth_mb": None if peak_end is None else peak_end - peak_early,
            "seconds_to_zero_sessions": time.monotonic() - t, "dropped": s["dropped"], "fps_target": s["fps"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--url", help="an already running server (default: start one)")
    p.add_argument("--model", default="digits-fast", help="the served model every viewer asks for")
    p.add_argument("--threads", type=int, default=None, help="the started server's torch threads")
    p.add_argument("--fps", type=float, default=None, help="the started server's --fps")
    p.add_argument("--hostile", action="store_true", help="add one hostile client (see above)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.seconds <= MAX_SECONDS:
        raise SystemExit(f"--clients must be in 1..{MAX_CLIENTS} and --seconds in 1..{MAX_SECONDS}")
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    try:
        report = asyncio.run(run(url, args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    report.update(clients=args.clients, seconds=args.seconds, model=args.model, hostile_client=args.hostile)
    target = report["fps_target"]
    print(f"{args.clients} viewers x {args.seconds:g} s, model {args.model}, target {target:g} frames/s each")
    print(" stream  frames/s  cv(frames per s)  longest gap  chunks  first chunk  errors")
    for i, s in enumerate(report["streams"]):
        cv = "-" if s["cv"] is None else f"{s['cv']:.2f}"
        gap = "-" if s["max_gap_s"] is None else f"{s['max_gap_s']:.2f} s"
        first = f"{s['first_chunk_s']:.1f} s" if "first_chunk_s" in s else "-"
        print(f" {i:6d}  {s['fps']:8.2f}  {cv:>16}  {gap:>11}  {s['chunks']:6d}  {first:>11}  {len(s['errors']):6d}")
        for e in s["errors"][:3]:
            print(f"          error: {e}")
    rss = ", ".join(f"{k}: {v:.1f} MB" for k, v in report["rss_mb"].items())
    rss_goal = HOSTILE_RSS_GROWTH_GOAL_MB if args.hostile else RSS_GROWTH_GOAL_MB
    peak = report["rss_peak_growth_mb"]
    print(f"server RSS {rss}; growth {report['rss_growth_mb']:+.1f} MB (goal <= {rss_goal:g}); its peak rose by "
          + ("(not reported)" if peak is None else f"{peak:+.1f} MB"))
    print(f"sessions while streaming: {report['sessions_during']}; after the viewers left: {report['sessions_after']} "
          f"(after {report['seconds_to_zero_sessions']:.2f} s); chunks dropped for slow viewers: {report['dropped']}")
    if args.hostile:
        h = report["hostile"]
        print(f"hostile client, {h['rounds']} rounds: " + "; ".join(
            f"{k}: " + ", ".join(f"{n} {what}" for what, n in sorted(v.items())) for k, v in h.items() if k != "rounds"))
        print(f"viewers' longest gap between chunks: {max(s['max_gap_s'] or 0 for s in report['streams']):.2f} s")
    growth = report["rss_growth_mb"] if peak is None else max(peak, report["rss_growth_mb"])
    goals = {f"rss growth (peak where reported) <= {rss_goal:g} MB": growth <= rss_goal,
             "sessions back to 0": report["sessions_after"] == 0,
             "no errors": not any(s["errors"] for s in report["streams"]),
             "every stream >= 90% of the target rate": all(s["fps"] >= 0.9 * target for s in report["streams"])}
    if args.hostile:
        h = report["hostile"]
        unanswered = sum(n for k, v in h.items() if k != "rounds" for what, n in v.items()
                         if what in ("no answer", "uploaded", "accepted") or what.startswith("closed without"))
        goals["every hostile message answered or closed, none let in"] = h["rounds"] > 0 and unanswered == 0
    report["goals"] = goals
    for name, ok in goals.items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
