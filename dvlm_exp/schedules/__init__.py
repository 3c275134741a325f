"""Denoising-step schedules (conf/schedule/<name>.yaml <-> dvlm_exp/schedules/<name>.py): at which global forwards (steps) a method acts, with what keep
ratio, and how its decisions persist (engine docstring: state | replay | none).

Steps are counted globally across blocks (the dMLLM study's convention): step 0 is the first
forward of the first block. `begin(total_steps)` is called per sample.
Each file registers its class with `@SCHEDULES.register("<name>")`.

  first_step   act at step 0, persist                      (LLaDA-FastV, RedVTP, study Tables 1-2)
  at_step      act at step `step`, persist
  start_frac   act at step floor(frac * S), persist         (study Table 3: start 25 / 50 / 75 %)
  late_step    start_frac with frac 0.75 by default          (the study's step-47-of-64 port)
  progressive  act at floor(f * S) for f in `fracs`, the keep ratio falling linearly from 1 to
               `ratio` over the stages, each stage pruning the already-pruned state
  every_step   act at every step from `start`, re-selecting from the full set (persist none)
  confidence   act once, at the first step after the mean top-1 probability of the still-masked
               answer slots reached `threshold` (the study's logits signal); `max_step` forces it
"""
