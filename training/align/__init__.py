"""Stage 2: PreSafe alignment — LoRA on the reasoning model with SFT plus a pre-CoT decision loss.

Training data, per teacher record of the training split:

- the frozen decision classifier scores the prompt text (refuse probability ``p``);
- ``p >= threshold`` (the classifier's ``metrics.json``): **Path A**, the target is an immediate
  refusal — empty think block, then one of a few fixed refusal sentences;
- otherwise **Path B**, the target is the base model's own CoT-ON answer from the teacher file
  (self-distillation, so reasoning is kept).

Loss ``L = L_sft + λ·L_decision``. ``L_sft`` is the causal-LM loss on the target tokens only.
``L_decision`` (``decision_head: linear``, the default): the residual streams of the chosen deeper layers at
the pre-CoT positions (assistant header through the opening ``<think>``, plus the prompt's last token: the
decision position), each normalised without parameters and averaged over layers and positions, go through
one linear logit; BCE against the classifier's decision. Decision-only examples (``decision_only_prompts``,
and the refuse prompts that ``sft_refuse_fraction`` < 1 strips of their target) have no SFT target and train
through ``L_decision`` alone. ``decision_head: classifier`` is the first reading: a projector maps the states
to ``k`` pseudo-token embeddings of the frozen classifier, BCE against its probability. The first
``projector_warmup_steps`` optimizer steps train only the head.

:class:`AlignTrainer` is a ``transformers.Trainer`` subclass (``compute_loss``), so ``accelerate
launch`` / ``torchrun`` work unchanged: the trained modules (LoRA, projector) and the frozen
classifier live in one :class:`PreSafeModel`, so DDP syncs the projector too. Checkpoints hold the
PEFT adapter and ``decision_head.safetensors``; ``resume_from_checkpoint`` restores both.

Output directory (written beside the target, then renamed into place):
``adapter/`` (a plain PEFT LoRA adapter that vLLM loads), ``decision_head/`` (projector weights and
config, kept out of the adapter), ``metrics.json``, ``log_history.jsonl``, ``config.json``.

Modules: :mod:`.data` (teacher records → tokenized Path A/B examples), :mod:`.model` (the frozen
classifier, the decision head, :class:`~training.align.model.PreSafeModel`, the head's files),
:mod:`.train` (the trainer, :func:`~training.align.train.train_align`, where a run writes).
"""
