"""``presafe eval``: evaluate whatever an OpenAI-compatible endpoint serves, model by model, on the same prompts.

Modules: :mod:`.data` (eval sets, arithmetic scoring, one row per request), :mod:`.stats` (the metrics),
:mod:`.run` (options and requests), :mod:`.report` (``eval.json``/``.md``/``.png``, ``responses.jsonl``).

Per model, overall, per source, per *eval set* and per *form*: harmful refusal rate, the share of refusals
taken before the CoT, benign over-refusal, arithmetic accuracy (last number of the answer part against the
known ``answer``), generated tokens (``usage.completion_tokens``) and the four decision paths; on
counterfactual pairs (a harmful and a benign prompt differing only in the task), the share where the
harmful twin is refused and the benign one answered. Rates come with Wilson 95% intervals. The report is
``eval.json``, ``eval.md``, ``eval.png`` and ``responses.jsonl`` (one row per request); an *ablation*
section compares PreSafe with its λ = 0 twin (plain SFT on the same targets).

Eval sets: the selected prompts grouped by source and label, with the edgy benign prompts of the
form-matched source apart (``formmatched/harmful``, ``formmatched/benign``, ``formmatched/edgy``,
``jailbreak/harmful``, ``advbench``, …), each a seeded sample of at most ``limit_per_set``. The decision
shows in the first tokens, so the sources in ``decision_sources`` are generated to at most
``decision_max_tokens`` (a refusal after a CoT cut there cannot be seen; rows cut by the limit are counted);
the others (arithmetic) and the ``<source>/uncapped`` set (``uncapped_n`` more prompts of
``uncapped_source``) get ``max_tokens``. ``mean_completion_tokens`` is the mean over the uncapped rows and
``mean_harmful_tokens`` over the uncapped harmful rows (the tokens a model spends on a harmful prompt).

Decision parsing (reasoning vs answer, refusal, path) is :mod:`service.core.decision`'s: a gateway's
``presafe`` extension field is used when present, otherwise the decision is computed here from the text,
so a plain vLLM endpoint works too. Where the completion starts (inside an opened think block or not)
is read, with ``think_start=auto``, from the endpoint's own rendering of a probe prompt (vLLM's
``/tokenize`` + ``/detokenize``); an endpoint without them gets the tracker's "unknown" rules.

Requests go through the official ``openai`` AsyncOpenAI client: bounded concurrency, the client's
retries with exponential backoff, a progress bar. A request that still fails is recorded as an error
and left out of the rates (the count is reported).
"""
