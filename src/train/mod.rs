//! The trainer: candle draft models, GGUF import/export, AdaSPEC and DistillSpec distillation.
//! Only built with the `train` feature; the engine and plugin never depend on it.

pub mod alloc;
pub mod cli;
pub mod data; // issue-5
pub mod error;
pub mod eval; // issue-5
pub mod export;
pub mod fspad_cli;
pub mod fspad_model;
pub mod fspad_train;
pub mod generate;
pub mod gguf_import;
pub mod head;
pub mod head_checkpoint;
pub mod head_cli;
pub mod head_model;
pub mod head_train;
pub mod loss; // issue-5
pub mod model;
pub mod plot;
pub mod prune;
pub mod teacher; // issue-5
pub mod train_cli; // issue-5
pub mod trainer; // issue-5

pub use error::{Error, Result};
pub use export::{export_gguf, write_draft_gguf, ExportType};
pub use gguf_import::{load_any, load_checkpoint, load_gguf, save_checkpoint};
pub use model::{Arch, Config, DraftModel, RopeStyle, Trainable, Weights};
