//! kiln-server end to end on loopback: webhooks, the queue, workers, statuses, the API.

mod api;
mod browser;
mod checks;
mod e2e;
mod postgres;
mod pull;
mod support;
mod vm;
mod webhooks;
