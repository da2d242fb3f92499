"""``posemb extend``: extend the context of a trained RoPE causal LM (a local Hugging Face folder).

One module per job:

* :mod:`~posemb.lab.extend.methods` — each method (``none``, ``linear``, ``ntk``, ``dynamic``,
  ``yarn``, ``llama3``, ``longrope``) as the ``rope_parameters`` transformers understands, and its
  per-pair stretch factors, from the schedules of :mod:`posemb.functional.rope_schedules`;
* :mod:`~posemb.lab.extend.hf_model` — checking a model folder before any work, loading it, putting
  a method's RoPE into the loaded model (its own rotary class, rebuilt from the new parameters);
* :mod:`~posemb.lab.extend.codec` — text to token ids (bytes for a byte-level model, else the folder's tokenizer);
* :mod:`~posemb.lab.extend.measure` — sliding-window perplexity by length and the passkey grid;
* :mod:`~posemb.lab.extend.search` — the LongRoPE-style evolutionary search of per-pair factors;
* :mod:`~posemb.lab.extend.finetune` — a short fine-tune at the target length (the lab's training loop);
* :mod:`~posemb.lab.extend.export` — the chosen method as a Hugging Face folder;
* :mod:`~posemb.lab.extend.report` — report.md, CSV, JSON and plots, with a computed verdict;
* :mod:`~posemb.lab.extend.run` — the workflow; :mod:`~posemb.lab.extend.command` — the CLI;
* :mod:`~posemb.lab.extend.demo_model` — the demo checkpoint: a tiny ``LlamaForCausalLM`` trained on
  the study's data at the study's length.

transformers is needed by every module that touches a model; it is imported inside functions.
"""
