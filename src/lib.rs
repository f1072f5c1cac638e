//! cyrnel: a host daemon that supervises real OS processes behind the
//! Processes part of the Cyrnel HTTP API. See ARCHITECTURE.md for the map:
//! `app` composes `api` → `supervisor` → `store` / `proc` over `model`.

pub mod api;
pub mod app;
pub mod client;
pub mod config;
pub mod events;
pub mod handover;
pub mod metrics;
pub mod model;
pub mod output;
pub mod proc;
pub mod retention;
pub mod service;
pub mod store;
pub mod supervisor;
