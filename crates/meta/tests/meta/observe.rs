use std::sync::{Arc, Mutex};
use std::time::Duration;

use garret_meta::{MetaError, Observer};

use crate::support::{TestDb, both, new_cache};

/// Every operation it is told of, in order.
#[derive(Debug, Default)]
struct Seen(Mutex<Vec<(&'static str, bool)>>);

impl Observer for Seen {
    fn finished(&self, operation: &'static str, _elapsed: Duration, failed: bool) {
        self.0.lock().unwrap().push((operation, failed));
    }
}

both! {
    async fn operations_are_reported_by_method_name(db: TestDb) {
        let seen = Arc::new(Seen::default());
        let meta = db.meta.clone().with_observer(seen.clone());
        meta.create_cache(&new_cache("main"), 10).await.unwrap();
        meta.cache("main").await.unwrap();
        // A missing row is an answer, not a failure of the database.
        assert!(matches!(meta.cache("nope").await, Err(MetaError::NotFound(_))));
        meta.ping().await.unwrap();
        assert_eq!(
            *seen.0.lock().unwrap(),
            [("create_cache", false), ("cache", false), ("cache", false), ("ping", false)]
        );
        // The handle it was cloned from reports nothing.
        db.cache("main").await.unwrap();
        assert_eq!(seen.0.lock().unwrap().len(), 4);
    }
}
