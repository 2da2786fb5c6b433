"""lm-evaluation-harness with the `ttte2e` backend registered: every argument goes to the
harness's own command line, so this accepts everything `lm_eval` accepts.

    python pipelines/lm_eval_harness.py --model ttte2e \
        --model_args pretrained=models:/ttt-e2e-3b@champion,mode=ttt \
        --tasks niah_single_1 --metadata '{"max_seq_lengths":[8192,32768]}' --batch_size 4

(Named so that it does not shadow the `lm_eval` package.) Needs the `eval` extra.
"""

from ttte2e.platform.cli.harness import main

if __name__ == "__main__":
    main()
