"""Fine-tuning recipe for the default QA model, and the SQuAD data and metric it uses."""
