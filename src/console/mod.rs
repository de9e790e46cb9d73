//! The console.

pub mod auth;
