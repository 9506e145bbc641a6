//! What the UCX tests share.

use kvtier_ucx::{Context, Worker};

/// Two workers of two contexts, as two daemons would have.
pub fn pair(settings: &[(&str, &str)]) -> (Worker, Worker) {
    let (a, b) = (Context::new(settings).unwrap(), Context::new(settings).unwrap());
    (Worker::new(&a).unwrap(), Worker::new(&b).unwrap())
}
