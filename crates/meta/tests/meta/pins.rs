use garret_meta::{InvalidPinName, MetaError, Pin, PinName};

use crate::support::{TestDb, both};

fn name(s: &str) -> PinName {
    PinName::new(s).unwrap()
}

fn path(c: char) -> String {
    format!("{}-hello-{c}", c.to_string().repeat(32))
}

both! {
    async fn pin_replace_list_unpin(db: TestDb) {
        let cache = db.cache_named("nix").await;
        let other = db.cache_named("other").await;

        let pinned = db.pin(cache, &name("release"), &path('a'), None, 10).await.unwrap();
        assert_eq!(pinned, Pin {
            name: name("release"),
            store_path: path('a'),
            store_path_hash: "a".repeat(32),
            expires_at: None,
            created_at: 10,
        });
        // The same name pins another path: replaced, not added.
        let moved = db.pin(cache, &name("release"), &path('b'), Some(500), 20).await.unwrap();
        assert_eq!(
            (moved.store_path_hash.as_str(), moved.expires_at, moved.created_at),
            ("b".repeat(32).as_str(), Some(500), 20)
        );
        assert_eq!(db.pin_named(cache, &name("release")).await.unwrap(), Some(moved.clone()));
        assert!(moved.is_expired(500) && !moved.is_expired(499));
        // Another cache's pins are its own.
        db.pin(other, &name("release"), &path('c'), None, 30).await.unwrap();
        assert_eq!(db.pins(cache, None, 10).await.unwrap(), [moved]);
        assert_eq!(db.count("nix_pins").await, 2);

        db.unpin(cache, &name("release")).await.unwrap();
        assert!(matches!(
            db.unpin(cache, &name("release")).await,
            Err(MetaError::NotFound("pin"))
        ));
        assert_eq!(db.pin_named(cache, &name("release")).await.unwrap(), None);
        assert!(db.pins(cache, None, 10).await.unwrap().is_empty());
        assert_eq!(db.pins(other, None, 10).await.unwrap().len(), 1);
    }

    async fn pins_page_in_byte_order(db: TestDb) {
        let cache = db.cache_named("nix").await;
        // Postgres' default collations would put "a-c" after "ab".
        let names = ["B", "a-c", "a.b", "a_b", "ab", "z9"];
        for n in names.iter().rev() {
            db.pin(cache, &name(n), &path('a'), None, 0).await.unwrap();
        }
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = db.pins(cache, after.as_ref(), 4).await.unwrap();
            listed.extend(page.iter().map(|p| p.name.to_string()));
            if page.len() < 4 {
                break;
            }
            after = page.last().map(|p| p.name.clone());
        }
        assert_eq!(listed, ["B", "a-c", "a.b", "a_b", "ab", "z9"]);
        // A limit beyond the cap is capped, not refused.
        assert_eq!(db.pins(cache, None, u32::MAX).await.unwrap().len(), names.len());
    }

    async fn pin_refuses_what_is_not_a_base_name(db: TestDb) {
        let cache = db.cache_named("nix").await;
        let short = "a".repeat(32);
        let no_dash = format!("{}_hello", "a".repeat(32));
        for bad in ["", "hello", short.as_str(), &format!("{short}-"), no_dash.as_str()] {
            let err = db.pin(cache, &name("p"), bad, None, 0).await.unwrap_err();
            assert!(matches!(err, MetaError::Invalid(_)), "{bad:?}: {err}");
        }
        assert_eq!(db.count("nix_pins").await, 0);
    }
}

#[test]
fn pin_names() {
    let long = "x".repeat(128);
    for good in ["a", "Z", "9", "release-24.05", "ci_main+1", long.as_str()] {
        assert_eq!(PinName::new(good).unwrap().as_str(), good);
    }
    let too_long = "x".repeat(129);
    for bad in [
        "",
        "-a",
        ".a",
        "..",
        "a b",
        "a/b",
        "a:b",
        "ä",
        too_long.as_str(),
    ] {
        assert_eq!(
            PinName::new(bad),
            Err(InvalidPinName(bad.to_owned())),
            "{bad:?}"
        );
    }
    assert!(
        PinName::new("a/b")
            .unwrap_err()
            .to_string()
            .contains("1-128 characters")
    );
}
