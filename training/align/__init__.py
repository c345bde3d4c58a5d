"""Stage 2: PreSafe alignment — LoRA on the reasoning model with SFT plus a pre-CoT decision loss.

Training data, per teacher record of the training split:

- the frozen decision classifier scores the prompt text (refuse probability ``p``);
- ``p >= threshold`` (the classifier's ``metrics.json``): **Path A**, the target is an immediate
  refusal — empty think block, then one of a few fixed refusal sentences;
- otherwise **Path B**, the target is the base model's own CoT-ON answer from the teacher file
  (self-distillation, so reasoning is kept).

Loss ``L = L_sft + λ·L_decision``. ``L_sft`` is the causal-LM loss on the target tokens only.
``L_decision``: the hidden states at the pre-CoT positions (assistant header through the opening
``<think>``, from :func:`service.core.cot.encode_example`) of the chosen deeper layers are averaged over
layers (and over positions for ``mean`` pooling), a trainable projector maps them to ``k``
pseudo-token embeddings of the frozen classifier, which reads ``[CLS] pseudo… [SEP]`` as
``inputs_embeds`` and returns a refuse logit; BCE against ``p``. Gradients pass through the frozen
classifier and the projector into the LoRA weights. The first ``projector_warmup_steps`` optimizer
steps run the LLM without gradients and train only the projector.

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
