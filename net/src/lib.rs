//! What kvtier's daemon, router and CLI share on the network side: [`tls`] (certificates read,
//! reloaded and checked; TLS accept; gRPC channels) and [`paths`] (default socket locations).

#![warn(missing_docs)]

pub mod paths;
pub mod tls;
