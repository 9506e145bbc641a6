//! Servers: each translates its wire format into calls on [`crate::node::Node`].

pub mod connector;
mod dispatch;
pub mod grpc;
pub mod http;
pub mod transfer;
