"""Serve PaliGemma on this machine: OpenAI's chat API, a native endpoint with boxes and masks, and a page.

    pip install -e ".[serve]"
    python serve.py                                   # the bundled tiny model at http://127.0.0.1:8000
    python serve.py --checkpoint DIR --quantize int4  # a released checkpoint, int4 weights
    python serve.py --port 0                          # any free port; the URL is printed when ready

Open the URL for the page. Any OpenAI client works unchanged: OpenAI(base_url="http://127.0.0.1:8000/v1",
api_key="-"); the last user message's text is the task prefix, its images the images (docs/serving.md).
The line "serving MODEL (...) at URL" is printed to stdout once the server accepts connections.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from sample import BUNDLED, BUNDLED_PROMPTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="Hugging Face PaliGemma directory or hub name (default: the "
                   "bundled tiny model)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub --checkpoint (default main)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization at load")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 (default), 128, 256")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: as sample.py)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--vae", default=None, help="big_vision's vae-oid.npz: 'segment' answers get masks")
    p.add_argument("--api-key", default=os.environ.get("NANOPALI_API_KEY"), help="require 'Authorization: Bearer "
                   "KEY' on /v1 (default: $NANOPALI_API_KEY, else no key)")
    p.add_argument("--allow-files", default=None, metavar="DIR", help="let requests name images as file:// URLs "
                   "inside DIR (default: data: URLs only)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together (default 16)")
    p.add_argument("--queue", type=int, default=64, help="most requests waiting; more get 503 (default 64)")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens a request may ask for, and what it "
                   "gets when it names none (default 256; never past the model's positions)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take, waiting included "
                   "(default 120)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model, for a big_vision .npz --checkpoint")
    p.add_argument("--variant", default=None, help="preset of a big_vision .npz (default: inferred from shapes)")
    return p.parse_args(argv)


def check(args) -> None:
    """Every flag that could only fail after minutes of loading, refused before."""
    from nanopali import InputError

    for name in ("max_batch", "queue", "max_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if not (args.timeout > 0 and args.max_body_mb > 0):
        raise InputError(f"--timeout and --max-body-mb must be > 0, got {args.timeout} and {args.max_body_mb}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    if args.vae is not None and not os.path.isfile(args.vae):
        raise InputError(f"--vae {args.vae}: no such file (big_vision's vae-oid.npz, docs/boxes-and-masks.md)")
    if args.allow_files is not None and not os.path.isdir(args.allow_files):
        raise InputError(f"--allow-files {args.allow_files}: no such directory")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be ≥ 1, got {args.threads}")


def listen(host: str, port: int) -> socket.socket:
    """The socket, bound before the model loads (a port in use fails at once); it accepts after loading."""
    from nanopali import InputError

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off only on sockets that say so, and a
        # small response held back for the client's delayed ACK costs 40 ms a request.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise InputError(f"Cannot listen on {host}:{port} ({e.strerror or e}); pick another --port (0 picks a "
                         "free one)") from None
    return sock


def main(argv=None) -> int:
    args = parse_args(argv)
    check(args)
    try:
        import uvicorn

        from nanopali.serve.app import Settings, create_app
    except ImportError as e:
        raise ImportError(f"serve.py needs FastAPI and uvicorn ({e}): pip install -e \".[serve]\"") from None
    import nanopali
    from nanopali.cpu import machine
    from nanopali.formats.files import resolve_device, resolve_dtype
    from nanopali.tasks.segmentation import MaskDecoder

    sock = listen(args.host, args.port)
    threads, note = machine.set_threads(args.threads)
    if note:
        print(f"(--threads: {note})", file=sys.stderr)
    ckpt = args.checkpoint or BUNDLED
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    npz = {"tokenizer": args.tokenizer, "variant": args.variant} if ckpt.endswith(".npz") else {}
    model, processor = nanopali.load(ckpt, dtype=dtype, device=device, quantize=args.quantize,
                                     group_size=args.group_size, revision=args.revision, **npz)
    mask_decoder = MaskDecoder.from_npz(args.vae) if args.vae else None
    name = os.path.basename(os.path.normpath(ckpt)) if os.path.exists(ckpt) else ckpt
    info = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "quantize": args.quantize,
            "threads": threads}
    settings = Settings(name, args.api_key, args.allow_files, args.max_batch, args.queue, args.max_tokens,
                        args.timeout, int(args.max_body_mb * 2 ** 20), info,
                        tuple(BUNDLED_PROMPTS) if ckpt == BUNDLED else ())
    app = create_app(model, processor, settings, mask_decoder)
    # Connections beyond the queue and the batch being decoded get uvicorn's plain 503 before any body is read.
    config = uvicorn.Config(app, limit_concurrency=args.queue + args.max_batch + 32, timeout_keep_alive=5)
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    quant = f", {args.quantize}" if args.quantize else ""
    print(f"serving {name} ({device}, {info['dtype']}{quant}, {threads} threads) at {url}  "
          f"(page: {url}/ ; OpenAI API: {url}/v1)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"(warning: --host {args.host} lets other machines in, and no --api-key is set)", file=sys.stderr)
    # The decode loop runs here, on the main thread that loaded the model (torch's threads are fastest on it:
    # nanopali/serve/batcher.py, Batcher.run); uvicorn's event loop serves HTTP from a thread of its own.
    server = uvicorn.Server(config)

    def serve_http():
        try:
            server.run(sockets=[sock])
        finally:
            app.state.batcher.close()   # uvicorn stopped: stop decoding too
    http = threading.Thread(target=serve_http, name="http", daemon=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # `kill`: leave through the finally below
    http.start()
    try:
        app.state.batcher.run()
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except (ValueError, OSError, ImportError) as e:  # InputError and CheckpointError are ValueErrors
        from nanopali.formats.files import printable

        print(f"error: {printable(str(e))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
