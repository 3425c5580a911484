"""vLLM's own `LLM.generate` on a list of prompts: the reference PCM's rows must match.

Run as a script (vLLM spawns processes, so it needs the __main__ guard):
    python reference_generate.py MODEL PROMPTS.json ENGINE.json SAMPLING.json TEXTS.json
"""
import json
import sys

if __name__ == "__main__":
    from vllm import LLM

    from pcm_service.protocol import EngineSettings, SamplingSettings
    from worker_image.engines import VllmEngine

    model, prompts_file, engine_file, sampling_file, out_file = sys.argv[1:6]
    prompts = json.load(open(prompts_file))
    engine = EngineSettings.model_validate_json(open(engine_file).read())
    sampling = SamplingSettings.model_validate_json(open(sampling_file).read())
    llm = LLM(model=model, **engine.engine_args())
    outs = llm.generate(prompts, VllmEngine.sampling_params(sampling, sampling.max_tokens or 16), use_tqdm=False)
    with open(out_file, "w") as fh:  # vLLM logs to stdout, so not there
        json.dump([o.outputs[0].text for o in outs], fh)
