"""Memory of `pcm serve` while the official openai client uploads a 100,000-line batch file and
the service validates it and stores its rows (goal: RSS grows by < 200 MB).

    python -m bench.upload_memory [--lines 100000]

No engine runs: the batch's model is a stand-in directory (with a chat template), so the run
measures the service alone. RSS is sampled every 20 ms from /proc.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import openai

from pcm_service.protocol import NamedModel
from tests.support.memory import PeakRss, rss_mb
from tests.support.models import fake_model
from tests.support.serve import ServeProcess


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lines", type=int, default=100_000)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pcm-upload-bench-"))
    model = tmp / "models" / "m"
    fake_model(model)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    batch = tmp / "big.jsonl"
    with batch.open("w") as fh:
        for i in range(args.lines):
            fh.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "m", "max_tokens": 32, "temperature": 0, "messages": [
                                     {"role": "system", "content": "You check claims. Answer True or False."},
                                     {"role": "user", "content": f"Claim {i}: the river {i % 97} flows north."}]}})
                     + "\n")
    size_mb = batch.stat().st_size / 2**20
    serve = ServeProcess(tmp / "state", model_roots=[tmp / "models"]).start()
    assert serve.proc is not None
    try:
        serve.client().request("POST", "/served-models", NamedModel(name="m", path=str(model)))
        client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key=serve.api_token, max_retries=0, timeout=600)
        base = rss_mb(serve.proc.pid)
        t0 = time.monotonic()
        with PeakRss(serve.proc.pid) as upload, batch.open("rb") as fh:
            f = client.files.create(file=fh, purpose="batch")
        t_upload = time.monotonic() - t0
        t0 = time.monotonic()
        with PeakRss(serve.proc.pid) as create:
            b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
            while (b := client.batches.retrieve(b.id)).status == "validating":
                time.sleep(0.1)
        t_create = time.monotonic() - t0
        assert b.status == "in_progress" and b.request_counts and b.request_counts.total == args.lines, b
    finally:
        serve.stop()
    print(f"batch file: {args.lines} lines, {size_mb:.1f} MiB")
    print(f"service RSS before upload:            {base:7.1f} MiB")
    print(f"upload ({t_upload:5.1f} s):  peak RSS {upload.peak:7.1f} MiB, growth {upload.peak - base:6.1f} MiB"
          f" = {(upload.peak - base) / size_mb:.2f} x the file")
    print(f"validate + store {args.lines} rows ({t_create:5.1f} s): peak RSS {create.peak:7.1f} MiB,"
          f" growth {create.peak - base:6.1f} MiB = {(create.peak - base) / size_mb:.2f} x the file")
    print(f"goal: growth < 200 MiB -> {'met' if max(upload.peak, create.peak) - base < 200 else 'NOT met'}")


if __name__ == "__main__":
    main()
