"""`python -m benchmarks.quality`: the comparison at lengths where loss curves separate, with seeds.

Two workloads, as in `benchmarks.compare` but longer: pre-training a ~19M-parameter LLaMA from scratch on the Python
documentation (2000 steps) and fine-tuning SmolLM2-135M on GSM-style problems (300 steps). lowmem, fp32 AdamW and
bf16 AdamW run with several seeds (the noise band); galore-torch, APOLLO, LoRA and lowmem's ablations with one.
Each finished (method, seed) run is stored as JSON under the output directory, so an interrupted study continues
where it stopped (a run that was cut off mid-way starts that run again). The report states each claim as
reproduced, not reproduced or within noise, computed from the numbers.

Modules: `plan` (workloads per seed, sizes, method sets), `ledger` (finished runs on disk), `bands` (seed statistics
and the claims), `report` (markdown and the loss-curve figure), `__main__` (the command).
"""
