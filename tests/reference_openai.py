"""vLLM's own answer to each line of an OpenAI batch file, each line run alone: `LLM.chat` for
chat lines, `LLM.generate` for completions, with the body mapped to SamplingParams here (as
vLLM's OpenAI server maps it), independently of PCM's code.

    python reference_openai.py MODEL ENGINE.json BATCH.jsonl OUT.json   (OUT: custom_id → [texts])
"""
import json
import sys
from typing import Any, Optional


def structured(rf: Optional[dict[str, Any]]) -> Any:
    from vllm.sampling_params import StructuredOutputsParams

    if rf is None:
        return None
    if rf["type"] == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=rf["json_schema"]["schema"])


def sampling_params(body: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    assert limit is not None, "reference lines must set max_tokens"
    stop = body.get("stop")
    return SamplingParams(n=body.get("n", 1), temperature=body.get("temperature", 1.0),
                          top_p=body.get("top_p", 1.0), seed=body.get("seed"), max_tokens=limit,
                          stop=[stop] if isinstance(stop, str) else stop,
                          presence_penalty=body.get("presence_penalty", 0.0),
                          frequency_penalty=body.get("frequency_penalty", 0.0),
                          structured_outputs=structured(body.get("response_format")))


if __name__ == "__main__":
    from vllm import LLM

    model, engine_file, batch_file, out_file = sys.argv[1:5]
    # chunked prefill off, as PCM runs the CPU build (a seeded request's chunked prefill kills it)
    llm = LLM(model=model, enable_chunked_prefill=False, **json.load(open(engine_file)))
    texts = {}
    for raw in open(batch_file):
        line = json.loads(raw)
        body = line["body"]
        if line["url"] == "/v1/chat/completions":
            (res,) = llm.chat(body["messages"], sampling_params(body), use_tqdm=False)
        else:
            (res,) = llm.generate([body["prompt"]], sampling_params(body), use_tqdm=False)
        texts[line["custom_id"]] = [c.text for c in sorted(res.outputs, key=lambda c: c.index)]
    with open(out_file, "w") as fh:  # vLLM logs to stdout, so not there
        json.dump(texts, fh)
