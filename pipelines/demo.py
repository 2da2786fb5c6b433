"""The README's main job: a private Ray head, then `ray job submit` of prepare_data and of
pretrain_3b.py --preset tiny, on this machine (a few minutes on a 2-core CPU).

    python pipelines/demo.py [--steps 240] [--out-dir runs/demo]
"""

from ttte2e.platform.cluster.demo_job import main

if __name__ == "__main__":
    main()
