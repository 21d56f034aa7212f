"""Cost of recording sampling log-probs (rollout.sample(record_logprobs=True)) on the bundled
SmolLM2-135M at the default run's sizes (2 prompts x G=8, 48 new tokens forced), per sampler:
the best of 3 timings with and without recording.

    OMP_NUM_THREADS=1 python benchmarks/record_logprobs.py loop generate
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from simple_grpo.models import BUNDLED, load_model, load_tokenizer  # noqa: E402
from simple_grpo.gen.rollout import SampleSettings, eos_token_ids, sample  # noqa: E402


def main(samplers: list[str]) -> None:
    torch.set_num_threads(1)
    tok, model = load_tokenizer(BUNDLED), load_model(BUNDLED, "float32", "cpu").eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}],
                                       tokenize=False, add_generation_prompt=True)
               for a, b in ((3, 4), (5, 2))]
    eos = eos_token_ids(tok, model)
    for sampler in samplers:
        s = SampleSettings(num_generations=8, max_new_tokens=48, min_new_tokens=48, sampler=sampler)
        best = {False: float("inf"), True: float("inf")}
        for rep in range(3):
            for record in (False, True):
                torch.manual_seed(rep)
                t = time.perf_counter()
                sample(model, tok, prompts, s, eos, record_logprobs=record)
                best[record] = min(best[record], time.perf_counter() - t)
        print(f"{sampler}: 16 rows x 48 tokens: {best[False]:.3f} s, with record_logprobs "
              f"{best[True]:.3f} s ({100 * (best[True] / best[False] - 1):+.1f}%)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["loop", "generate"])
