"""The data layer: documents -> tokenizer -> Megatron indexed dataset -> GPTDataset samples.

    corpus.py     documents: ten Gutenberg novels read out of Debian's R data packages, or .txt/.jsonl files
    tokenizer.py  byte-level BPE (the `tokenizers` package) that megatron-core's GPTDataset also accepts
    prepare.py    `tapa data prepare`: held-out test books, tokenizer.json, train_text_document.bin/.idx
    dataset.py    train/valid GPTDatasets of seq_length-token samples from a prepared directory
"""
