//! kvtier's cluster router (`kvtier router`, a Deployment of its own): follows every node's
//! `CacheService` event stream into one global index and sends each request where its prefix
//! already is, balanced against load.
//!
//! Pure parts ([`index`], [`score`], [`sim`]) are shared with `kvtier sim --nodes`; [`feed`]
//! follows the daemons, [`service`] answers `kvtier.v1.RouterService`, and [`prefetch`] warms
//! the chosen node when part of the prefix is only on its disk.

#![warn(missing_docs)]

pub mod feed;
pub mod index;
pub mod prefetch;
pub mod score;
pub mod service;
pub mod sim;
