//! The integration tests, as one binary (one link, one harness): every
//! module starts the real `cyrneld` (or `cyrnelctl`) through `support` and
//! checks real outcomes. `cargo test --test it kill::` runs one module.

mod support;

mod api_contract;
mod cli;
mod edge;
mod events;
mod handover;
mod idempotency;
mod kill;
mod lifecycle;
mod list_index;
mod manager;
mod metrics;
mod openapi;
mod props;
mod readopt;
mod reload;
mod resources;
mod sandbox;
mod storage;
mod tidy;
