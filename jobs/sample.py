"""Sample text from a trained model, streamed to the terminal.

    python jobs/sample.py --model models:/llama-tiny/1 --prompt "Fellow citizens"
    python jobs/sample.py --model models:/llama-tiny@champion --temperature 0.7 --top-p 0.9
    python jobs/sample.py --model runs:/<run_id> | --model .generalmodel/store/checkpoints/llama-tiny/export
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generalmodel.cli import user_errors_exit  # noqa: E402
from generalmodel.config import StorageConfig  # noqa: E402
from generalmodel.infer import SamplingParams, fetch, load_model, sample_text  # noqa: E402
from generalmodel.tracking import LOCAL_DB  # noqa: E402


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID or an export URI")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one empty prompt")
    parser.add_argument("--tracking-uri", default=None, help=f"MLflow tracking URI (default: sqlite {LOCAL_DB})")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with user_errors_exit():
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.max_new_tokens, args.seed)
        tracking = args.tracking_uri or f"sqlite:///{Path(LOCAL_DB).resolve()}"
        model, tokenizer = load_model(fetch(args.model, tracking, StorageConfig().resolved()))
        outputs = []
        for prompt in args.prompt or [""]:
            print(f"--- {prompt!r}", flush=True)
            print(prompt, end="", flush=True)
            pieces = []
            for piece in sample_text(model, tokenizer, prompt, params):
                print(piece, end="", flush=True)
                pieces.append(piece)
            print(flush=True)
            outputs.append(prompt + "".join(pieces))
        return outputs


if __name__ == "__main__":
    main()
