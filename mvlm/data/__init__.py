"""Multimodal data pipeline: ms-swift-format rows -> templates -> packed micro-batches.

Modules (import what you need; this package imports nothing heavy on its own):

* ``formats``       row shapes (messages, query/response, pretraining, preference, RL) -> Sample
* ``media``         images (EXIF, header probe), video frames, audio; pixel/frame budgets; DALI
* ``template``      the generic Template (chat rendering, labels, truncation that never cuts an
                    image) and get_template; each family's subclass (vision-token expansion,
                    equal to the HF processor's output) is in mvlm/models/<family>/template.py
* ``mrope``         per-sample 3-D mRoPE positions (equal to HF get_rope_index)
* ``dataset_spec``  ``--dataset a.jsonl 'b.jsonl#2000' dir``, val split, streaming
* ``dataset``       eager (datasets.map, num_proc) / lazy / streaming encoded datasets
* ``packing``       best-fit-decreasing packing plan, packed dataset views
* ``collate``       the micro-batch contract (shifted labels, cu_seqlens, position_ids[3,B,S]),
                    CP load-balanced split indices
* ``loader``        deterministic DP-sharded resumable sampler, DataLoader
* ``encode``        ``mvlm encode`` and the trainer entry points (build_train_dataset,
                    build_dataloader, add_data_args)
* ``errors``        BadSampleError and the --on_bad_sample counter
"""
