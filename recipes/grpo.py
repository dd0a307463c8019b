"""Logit-averaging GRPO on pi_mix, or the KL-GRPO baseline (algorithm.ref_weight=0 algorithm.beta=0.05).

    torchrun --nproc-per-node 2 recipes/grpo.py --config configs/grpo_logitavg_tiny.yaml \\
        model.policy=SFT_DIR data.train=F

With no `rollout.urls`, rank 0 starts one rollout server on 127.0.0.1 (stopped at the end). A rerun with the
same `run.dir` resumes from its newest checkpoint; SIGTERM or SIGUSR1 checkpoints and exits after the step.
The run itself is `nemo_logitavg.trainer.main.run_grpo`.
"""

from __future__ import annotations

from nemo_logitavg.trainer.main import main

if __name__ == "__main__":
    main(recipe="grpo", description=__doc__)
