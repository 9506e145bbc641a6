//! The thin cluster router: follows every node's `CacheService` event stream into one global
//! index and sends each request where its prefix already is, balanced against load.
//!
//! Pure parts ([`index`], [`score`], [`sim`]) are shared with `kvtier sim --nodes`; [`feed`]
//! follows the daemons and [`service`] answers `kvtier.v1.RouterService`.

pub mod feed;
pub mod index;
pub mod score;
pub mod service;
pub mod sim;
