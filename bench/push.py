"""`make bench-push`: Hub in, Hub out through tests/support/hub_server.py (the local stand-in for the Hub), both
directions paced to one rate, to see what `--push-to-hub` costs over the transfers it cannot avoid.

Measured, one after the other on one stand-in: the source repo downloaded alone (huggingface_hub's
`snapshot_download`), the output uploaded alone (`upload_folder` of a local run's output, the same bytes), then
`fp8q quantize SRC --push-to-hub` with no OUT while a thread samples the local disk the run holds (its staging
folder and HF_HOME), then a push whose 4th upload is refused and its `--resume`, then `fp8q verify` of the pushed repo
against its source, both streamed (against downloading the pushed repo alone). Each is a child process run as a user
runs it. Prints one JSON object.

    python bench/push.py [--shards 8] [--shard-mb 32] [--rate-mb 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.hub_server import HubServer  # noqa: E402
from tests.support.hub_server import disk_bytes as _disk  # noqa: E402

SRC = "org/model"
TOKENS = {"hf_write": ("me", "write")}


def _source(folder: Path, shards: int, shard_mb: int) -> None:
    """A Llama-like repo: each shard one layer's up and down projections (bf16) and a norm."""
    folder.mkdir(parents=True)
    cols = 4096
    rows = shard_mb * 1024 * 1024 // 2 // cols // 2  # two weights of rows x cols bf16 a shard
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, cols).to(torch.bfloat16),
            f"model.layers.{i}.mlp.down_proj.weight": torch.randn(cols, rows).to(torch.bfloat16),
            f"model.layers.{i}.input_layernorm.weight": torch.ones(cols, dtype=torch.bfloat16),
        }
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))


def _env(hub: HubServer, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FP8Q_"))}
    return env | {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home / "hf"),
        "HF_TOKEN": "hf_write",
        "HF_HUB_DISABLE_XET": "1",
        "XDG_CACHE_HOME": str(home / "cache"),
        "PYTHONPATH": str(ROOT),
    }


def _timed(cmd: list[str], env: dict[str, str], watch: tuple[Path, ...] = ()) -> tuple[float, int, str]:
    """(wall seconds, peak bytes under `watch` sampled every 5 ms, stderr) of a child process; fails if it fails."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _disk(*watch))

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
    if run.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({run.returncode}): {run.stderr[-2000:]}")
    return wall, peak[0], run.stderr


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--rate-mb", type=float, default=16.0, help="MB/s each direction")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fp8q-bench-push-"))
    try:
        _source(work / "repos" / SRC, args.shards, args.shard_mb)
        local = work / "local"
        subprocess.run(
            [sys.executable, "-m", "fp8q", "quantize", str(work / "repos" / SRC), str(local), "--device", "cpu", "-q"],
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        hub = HubServer(work / "repos", tokens=TOKENS)
        hub.faults.throttle_bytes_per_s = args.rate_mb * 1e6
        src_bytes = _disk(work / "repos" / SRC)
        shards = sorted(p for p in (work / "repos" / SRC).glob("*.safetensors"))
        out_shards = sorted(p.stat().st_size for p in local.glob("*.safetensors"))
        side = _disk(local) - sum(out_shards)
        try:
            down, _, _ = _timed(
                _python(f"from huggingface_hub import snapshot_download; snapshot_download({SRC!r})"),
                _env(hub, work / "down"),
            )
            up, _, _ = _timed(
                _python(
                    "from huggingface_hub import HfApi; api = HfApi(); api.create_repo('me/alone'); "
                    f"api.upload_folder(folder_path={str(local)!r}, repo_id='me/alone')"
                ),
                _env(hub, work / "up"),
            )
            push_home = work / "push"
            push, peak, _ = _timed(
                [sys.executable, "-m", "fp8q", "quantize", SRC, "--push-to-hub", "me/fp8", "--device", "cpu", "-q"],
                _env(hub, push_home),
                (push_home / "cache", push_home / "hf"),
            )
            # What a CI job does next: verify the published repo against its source, both streamed from the Hub;
            # against downloading the published repo alone (the source's download alone is measured above).
            out_down, _, _ = _timed(
                _python("from huggingface_hub import snapshot_download; snapshot_download('me/fp8')"),
                _env(hub, work / "down-out"),
            )
            verify_home = work / "verify"
            (verify_home / "tmp").mkdir(parents=True)
            verified, verify_peak, _ = _timed(
                [sys.executable, "-m", "fp8q", "verify", "me/fp8", "--source", SRC, "--quiet"],
                _env(hub, verify_home) | {"TMPDIR": str(verify_home / "tmp")},
                (verify_home / "tmp", verify_home / "hf"),
            )
            sizes = sorted((p.stat().st_size for p in shards), reverse=True)
            bound = sizes[0] + sizes[1] + out_shards[-1] + out_shards[-2] + side + 64 * 1024

            # A push whose 4th upload is refused, then its --resume.
            hub.faults.refuse_upload_after = hub.faults.uploads + 3  # the 4th upload of this run
            resume_home = work / "resume"
            cmd = [sys.executable, "-m", "fp8q", "quantize", SRC, "--push-to-hub", "me/again", "--device", "cpu", "-q"]
            failed = subprocess.run(cmd, capture_output=True, text=True, env=_env(hub, resume_home))
            first = [r.file for r in hub.requests if r.kind == "upload" and r.status == 200 and r.repo == "me/again"]
            hub.faults.refuse_upload_after = None
            seen = len(hub.requests)
            resumed, _, _ = _timed([*cmd, "--resume"], _env(hub, resume_home))
            again = [r for r in hub.requests[seen:] if r.kind == "upload" and r.status == 200]
            downloads = [r for r in hub.requests[seen:] if r.downloads and r.file.endswith(".safetensors")]
        finally:
            hub.close()
        print(
            json.dumps(
                {
                    "shards": args.shards,
                    "source_bytes": src_bytes,
                    "output_bytes": _disk(local),
                    "rate_bytes_per_s_each_way": args.rate_mb * 1e6,
                    "download_alone_s": round(down, 2),
                    "upload_alone_s": round(up, 2),
                    "push_s": round(push, 2),
                    "push_over_slower": round(push / max(down, up), 3),
                    "peak_local_disk_bytes": peak,
                    "disk_bound_bytes": bound,
                    "refused_run_exit_code": failed.returncode,
                    "refused_run_error": failed.stderr.strip().splitlines()[-1] if failed.stderr.strip() else "",
                    "uploaded_before_refusal": len(first),
                    "resume_uploads": len(again),
                    "resume_source_downloads": len(downloads),
                    "resume_s": round(resumed, 2),
                    "download_output_alone_s": round(out_down, 2),
                    "verify_against_source_s": round(verified, 2),
                    "verify_over_both_downloads": round(verified / (down + out_down), 3),
                    "verify_peak_local_disk_bytes": verify_peak,
                },
                indent=1,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
