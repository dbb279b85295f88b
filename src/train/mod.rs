//! The trainer: candle draft models, GGUF import/export, AdaSPEC and DistillSpec distillation.
//! Only built with the `train` feature; the engine and plugin never depend on it.
