"""2PC worker: runs inside the SPU venv (Python 3.10/3.11, numpy < 2, jax ≤ 0.4.34, spu 0.9.5).

Never imports torch (the SPU venv has none) nor the rest of relucomp: it is run
as a script, ``python worker.py COMMAND ...``, by :mod:`relucomp.pi.bench`.

Commands (each writes one JSON file given by ``--result``):

``compile``  ONNX → JAX (:mod:`onnx2jax`) → SPU executable (``exe.bin``), plus
             the plaintext JAX output on the image (``plain.npy``).
``plain``    only the plaintext JAX output (checks the translation).
``party``    one party of the 2PC run, a separate process; ``--rank 0`` is the
             server (holds the weights, reads the ONNX file), ``--rank 1`` the
             client (holds the image, never reads the weights).  The parties
             talk over brpc on 127.0.0.1 only.  Protocol:

             1. setup (once per model): the server secret-shares the weights and
                sends the client its share;
             2. per inference: the client secret-shares the image and sends the
                server its share;
             3. ``run`` the executable once (first run: includes one-time
                protocol setup — OT extension / HE keys), then ``--repeat``
                timed runs, each between two barriers;
             4. the server sends its output share; the client reconstructs.

             Latency is wall time of ``Runtime.run`` per party; communication is
             the kernel's TCP byte counters (``TCP_INFO``: ``bytes_received``)
             of the party's sockets — payload bytes actually on the wire,
             including brpc framing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import sys
import time

import numpy as np

try:  # imported as relucomp.pi.worker (main env, tests) or run as a script (SPU venv)
    from . import onnx2jax
except ImportError:  # pragma: no cover - script mode
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import onnx2jax  # type: ignore[no-redef]

CHUNK = 8 << 20  # bytes per link message (brpc's default body limit is 64 MiB)
_TCP_INFO_BYTES_ACKED = 120
_TCP_INFO_BYTES_RECEIVED = 128


# ---------------------------------------------------------------------------
# communication accounting
# ---------------------------------------------------------------------------

def tcp_bytes() -> tuple[int, int]:
    """(bytes acked by peers, bytes received) summed over this process's TCP sockets."""
    acked = received = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(fd)))
        except (OSError, ValueError):
            continue
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                continue
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
            if len(info) < 136:
                continue
            a, r = struct.unpack_from("QQ", info, _TCP_INFO_BYTES_ACKED)
            acked += a
            received += r
        except OSError:
            pass
        finally:
            s.close()
    return acked, received


# ---------------------------------------------------------------------------
# SPU helpers
# ---------------------------------------------------------------------------

def runtime_config(protocol: str, field: str = "FM64", fxp_bits: int = 0):
    import spu.libspu as libspu

    prot = {"cheetah": libspu.ProtocolKind.CHEETAH, "semi2k": libspu.ProtocolKind.SEMI2K}[protocol]
    fld = {"FM64": libspu.FieldType.FM64, "FM128": libspu.FieldType.FM128, "FM32": libspu.FieldType.FM32}[field]
    cfg = libspu.RuntimeConfig(protocol=prot, field=fld, fxp_fraction_bits=int(fxp_bits))
    return cfg


SHARE_MAGIC = b"RCSHARE1"


def encode_share(meta: bytes, chunks: list[bytes]) -> bytes:
    """A share as plain bytes: magic, then length-prefixed meta and chunks (no pickle).

    What the other party sends is data, never code: this format has no
    object references to resolve, so a hostile peer can at worst make
    :func:`decode_share` refuse the message.
    """
    out = bytearray(SHARE_MAGIC)
    out += struct.pack("<QI", len(meta), len(chunks)) + bytes(meta)
    for c in chunks:
        out += struct.pack("<Q", len(c)) + bytes(c)
    return bytes(out)


def decode_share(data: bytes) -> tuple[bytes, list[bytes]]:
    """Inverse of :func:`encode_share`; ``ValueError`` for anything else (e.g. a pickle)."""
    data = bytes(data)
    if not data.startswith(SHARE_MAGIC):
        raise ValueError("refusing a share message that is not in relucomp's share format "
                         f"(starts with {data[:8]!r}); pickles from the other party are never loaded")
    i = len(SHARE_MAGIC)
    if len(data) < i + 12:
        raise ValueError("truncated share message")
    n_meta, n_chunks = struct.unpack_from("<QI", data, i)
    i += 12
    if i + n_meta > len(data):
        raise ValueError("truncated share message")
    meta = data[i:i + n_meta]
    i += n_meta
    chunks = []
    for _ in range(n_chunks):
        if i + 8 > len(data):
            raise ValueError("truncated share message")
        (ln,) = struct.unpack_from("<Q", data, i)
        i += 8
        if i + ln > len(data):
            raise ValueError("truncated share message")
        chunks.append(data[i:i + ln])
        i += ln
    if i != len(data):
        raise ValueError("trailing bytes after a share message")
    return meta, chunks


def _pack_share(share) -> bytes:
    return encode_share(bytes(share.meta), [bytes(c) for c in share.share_chunks])


def _unpack_share(data: bytes):
    import spu.libspu as libspu

    meta, chunks = decode_share(data)
    s = libspu.Share()
    s.meta = meta
    s.share_chunks = chunks
    return s


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """Decode one protobuf varint at ``buf[i]``; return (value, next index)."""
    v, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    """Minimal protobuf reader (varint and length-delimited fields only)."""
    out, i = [], 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(buf, i)
            out.append((num, wt, v))
        elif wt == 2:
            ln, i = _read_varint(buf, i)
            out.append((num, wt, buf[i:i + ln]))
            i += ln
        else:
            raise ValueError(f"unexpected protobuf wire type {wt}")
    return out


def _encode(fields: list[tuple[int, int, object]]) -> bytes:
    out = bytearray()
    for num, wt, v in fields:
        out += _varint((num << 3) | wt)
        if wt == 0:
            out += _varint(int(v))
        else:
            out += _varint(len(v)) + bytes(v)
    return bytes(out)


def private_shares(io, arr: np.ndarray, owner: int, field: str = "FM64", with_data: bool = True) -> list:
    """Shares of a value *private* to ``owner`` (SPU's ``Priv2k`` type; no secret sharing).

    SPU 0.9.5's Cheetah IO only makes secret or public shares, but its runtime
    has private values (linear layers with them run as Cheetah's HE matmul
    ``mmul_av``: the server's plaintext weights never leave the server).  We
    take the public encoding and relabel it: the owner keeps the fixed-point
    data, every other party gets a zero placeholder of the same size (built
    without the values when ``with_data`` is False).
    """
    import spu.libspu as libspu

    pub = io.make_shares(arr if with_data else np.zeros_like(arr), libspu.Visibility.VIS_PUBLIC)[0]
    stype = f"Priv2k<{field},{owner}>".encode()
    meta = _encode([(n, w, (int(libspu.Visibility.VIS_PRIVATE) if n == 3 else stype if n == 5 else v))
                    for n, w, v in _fields(bytes(pub.meta))])
    shares = []
    for r in range(2):
        s = libspu.Share()
        s.meta = meta
        if r == owner and with_data:
            s.share_chunks = [bytes(c) for c in pub.share_chunks]
        else:
            chunks = []
            for c in pub.share_chunks:
                f = _fields(bytes(c))
                chunks.append(_encode([(n, w, (bytes(len(v)) if n == 3 else v)) for n, w, v in f]))
            s.share_chunks = chunks
        shares.append(s)
    return shares


def _send(lctx, dst: int, data: bytes) -> None:
    n = max(1, -(-len(data) // CHUNK))
    lctx.send(dst, struct.pack("<Q", n))
    for i in range(n):
        lctx.send(dst, data[i * CHUNK:(i + 1) * CHUNK])


def _recv(lctx, src: int) -> bytes:
    n = struct.unpack("<Q", bytes(lctx.recv(src)))[0]
    return b"".join(bytes(lctx.recv(src)) for _ in range(n))


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("spu", "jax", "jaxlib", "onnx"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------

def cmd_compile(a) -> dict:
    import jax
    import spu.libspu as libspu
    import spu.utils.frontend as spu_fe

    t0 = time.perf_counter()
    model = onnx2jax.translate(a.model)
    x = np.load(a.image, allow_pickle=False).astype(np.float32)
    params = model.params()
    t1 = time.perf_counter()
    if a.weights == "public":  # the model is public: weights become constants of the program
        names = ["x"]
        exe, _ = spu_fe.compile(spu_fe.Kind.JAX, lambda x: model(x, *params), [x], {}, names,
                                [libspu.Visibility.VIS_SECRET], lambda outs: [f"y{i}" for i in range(len(outs))])
    else:
        names = ["x"] + [f"w{i}" for i in range(len(params))]
        exe, _ = spu_fe.compile(spu_fe.Kind.JAX, lambda x, *p: model(x, *p), [x, *params], {}, names,
                                [libspu.Visibility.VIS_SECRET] * len(names),
                                lambda outs: [f"y{i}" for i in range(len(outs))])
    t2 = time.perf_counter()
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "exe.bin"), "wb") as f:
        f.write(exe.SerializeToString())
    plain = np.asarray(jax.jit(lambda x, *p: model(x, *p))(x, *params))
    np.save(os.path.join(a.out_dir, "plain.npy"), plain)
    ops: dict[str, int] = {}
    for n in model.graph.nodes:
        ops[n.op] = ops.get(n.op, 0) + 1
    return {"input_names": names, "output_names": list(exe.output_names), "param_names": model.param_names,
            "param_shapes": [list(p.shape) for p in params], "weights": a.weights,
            "input_shape": list(x.shape), "output_shape": list(plain.shape), "onnx_ops": ops,
            "n_params": int(sum(p.size for p in params)), "translate_s": t1 - t0, "compile_s": t2 - t1,
            "pphlo_bytes": len(exe.code), "versions": versions()}


def cmd_plain(a) -> dict:
    import jax

    model = onnx2jax.translate(a.model)
    x = np.load(a.image, allow_pickle=False).astype(np.float32)
    y = np.asarray(jax.jit(lambda x, *p: model(x, *p))(x, *model.params()))
    np.save(a.out, y)
    return {"output_shape": list(y.shape), "param_names": model.param_names}


def cmd_party(a) -> dict:
    import spu
    import spu.libspu as libspu

    rank = int(a.rank)
    meta = json.load(open(os.path.join(a.dir, "compile.json")))
    exe = libspu.Executable()
    exe.ParseFromString(open(os.path.join(a.dir, "exe.bin"), "rb").read())
    cfg = runtime_config(a.protocol, a.field, a.fxp_bits)
    if a.profile and rank == 0:
        cfg.enable_pphlo_profile = True
        cfg.enable_hal_profile = True
    desc = libspu.link.Desc()
    desc.id = f"relucomp-pi-{a.session}"
    desc.add_party("server", f"127.0.0.1:{a.ports[0]}")
    desc.add_party("client", f"127.0.0.1:{a.ports[1]}")
    desc.recv_timeout_ms = int(a.timeout * 1000)
    desc.connect_retry_times = 120
    desc.connect_retry_interval_ms = 500
    desc.http_timeout_ms = int(a.timeout * 1000)
    t_start = time.perf_counter()
    lctx = libspu.link.create_brpc(desc, rank)
    rt = spu.Runtime(lctx, cfg)
    io = spu.Io(2, cfg)
    lctx.barrier()
    t_link = time.perf_counter() - t_start
    out: dict = {"rank": rank, "role": "server" if rank == 0 else "client", "link_s": t_link}

    # 1. weights: the server's private input, shared once per model
    b0, t0 = tcp_bytes(), time.perf_counter()
    param_vars = meta["input_names"][1:]
    weights = meta.get("weights", "private")
    if weights == "private":  # Cheetah's model: the server's plaintext weights stay on the server
        if rank == 0:
            params = onnx2jax.translate(a.model).params()
            for name, p in zip(param_vars, params):
                rt.set_var(name, private_shares(io, p, 0, a.field)[0])
        else:
            for name, shape in zip(param_vars, meta["param_shapes"]):
                rt.set_var(name, private_shares(io, np.zeros(shape, np.float32), 0, a.field, with_data=False)[1])
    elif weights == "secret":  # additive secret shares: the server sends the client its share
        if rank == 0:
            params = onnx2jax.translate(a.model).params()
            if len(params) != len(param_vars):
                raise RuntimeError("parameter list differs from the compiled executable's")
            for name, p in zip(param_vars, params):
                shares = io.make_shares(p, libspu.Visibility.VIS_SECRET)
                rt.set_var(name, shares[0])
                _send(lctx, 1, _pack_share(shares[1]))
        else:
            for name in param_vars:
                rt.set_var(name, _unpack_share(_recv(lctx, 0)))
    lctx.barrier()
    b1 = tcp_bytes()
    out["weights_share_s"] = time.perf_counter() - t0
    out["weights_share_bytes_received"] = b1[1] - b0[1]

    # 2. the image: the client's private input
    t0 = time.perf_counter()
    if rank == 1:
        x = np.load(a.image, allow_pickle=False).astype(np.float32)
        shares = io.make_shares(x, libspu.Visibility.VIS_SECRET)
        rt.set_var("x", shares[1])
        _send(lctx, 0, _pack_share(shares[0]))
    else:
        rt.set_var("x", _unpack_share(_recv(lctx, 1)))
    lctx.barrier()
    b2 = tcp_bytes()
    out["input_share_s"] = time.perf_counter() - t0
    out["input_share_bytes_received"] = b2[1] - b1[1]

    # 3. runs: the first one includes the protocol's one-time setup
    runs, rbytes = [], []
    for i in range(1 + int(a.repeat)):
        lctx.barrier()
        bb = tcp_bytes()
        t = time.perf_counter()
        rt.run(exe)
        dt = time.perf_counter() - t
        lctx.barrier()
        be = tcp_bytes()
        runs.append(dt)
        rbytes.append(be[1] - bb[1])
        sys.stdout.flush()
    out["first_run_s"] = runs[0]
    out["first_run_bytes_received"] = rbytes[0]
    out["run_s"] = runs[1:]
    out["run_bytes_received"] = rbytes[1:]

    # 4. output to the client
    t0 = time.perf_counter()
    shares = [rt.get_var(n) for n in meta["output_names"]]
    if rank == 0:
        for s in shares:
            _send(lctx, 1, _pack_share(s))
    else:
        ys = []
        for s in shares:
            other = _unpack_share(_recv(lctx, 0))
            ys.append(np.asarray(io.reconstruct([other, s])))
        np.save(a.out, ys[0])
    lctx.barrier()
    out["output_reveal_s"] = time.perf_counter() - t0
    out["versions"] = versions()
    try:
        lctx.stop_link()
    except Exception:  # noqa: BLE001
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="relucomp-pi-worker")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--model", required=True)
    c.add_argument("--image", required=True)
    c.add_argument("--out-dir", required=True)
    c.add_argument("--weights", default="private", choices=("private", "secret", "public"))
    c.add_argument("--result", required=True)
    q = sub.add_parser("plain")
    q.add_argument("--model", required=True)
    q.add_argument("--image", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--result", required=True)
    r = sub.add_parser("party")
    r.add_argument("--rank", type=int, required=True, choices=(0, 1))
    r.add_argument("--dir", required=True)
    r.add_argument("--ports", type=int, nargs=2, required=True)
    r.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    r.add_argument("--field", default="FM64")
    r.add_argument("--fxp-bits", type=int, default=0)
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--model")
    r.add_argument("--image")
    r.add_argument("--out")
    r.add_argument("--session", default="0")
    r.add_argument("--timeout", type=float, default=1800.0)
    r.add_argument("--profile", action="store_true")
    r.add_argument("--result", required=True)
    a = p.parse_args(argv)
    fn = {"compile": cmd_compile, "plain": cmd_plain, "party": cmd_party}[a.cmd]
    try:
        res = {"ok": True, **fn(a)}
    except Exception as exc:  # noqa: BLE001 - reported to the driver as JSON
        import traceback

        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    tmp = a.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, a.result)
    sys.stdout.flush()
    os._exit(0 if res["ok"] else 1)  # brpc threads may otherwise keep the process alive


if __name__ == "__main__":
    sys.exit(main())
