//! Rust client of kvtierd: connects to the connector socket, maps the shared pool, and saves and
//! loads blocks with one copy each way.
//!
//! ```no_run
//! # async fn demo() -> kvtier_client::Result<()> {
//! use kvtier_client::{Client, NamespaceDescriptor};
//! let mut c = Client::connect(&kvtier_client::default_socket(), "example").await?;
//! let ns = c.register(NamespaceDescriptor { model: "demo".into(), block_bytes: 4096, ..Default::default() }).await?;
//! let hashes = kvtier_client::testdata::chained_hashes(1, 2);
//! let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| kvtier_client::testdata::block(h, 4096)).collect();
//! c.save(&ns, &hashes, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await?;
//! assert_eq!(c.lookup(&ns, &hashes).await?, 2);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod bench;
mod conn;
mod pool;
pub mod stats;
pub mod testdata;

pub use bytes::Bytes;
pub use conn::{chunk_blocks, Client, ClientError, Namespace, Reservation, Result, SaveReport, CHUNK_BLOCKS};
pub use kvtier_net::paths::default_socket;
pub use kvtier_proto::v1::NamespaceDescriptor;
pub use pool::{OutOfBounds, PoolMapping, Slot};
