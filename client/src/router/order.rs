//! The order in which the router tries an app's regions: the caller's own region first, then
//! its preferred ones, then the rest by name. Pure: no caches, no network.

/// The order regions are tried in: `from` first, then `prefer` in order, then the rest by name;
/// only regions in `running`, each once.
pub fn order_regions(running: &[(String, u64)], from: &str, prefer: &[String]) -> Vec<String> {
    let mut names: Vec<&String> = running
        .iter()
        .filter(|(_, started)| *started > 0)
        .map(|(region, _)| region)
        .collect();
    names.sort();
    names.dedup();
    let mut order: Vec<String> = Vec::with_capacity(names.len());
    let mut take = |region: &str| {
        if names.iter().any(|n| *n == region) && !order.iter().any(|o| o == region) {
            order.push(region.to_owned());
        }
    };
    take(from);
    for region in prefer {
        take(region);
    }
    for region in names.clone() {
        take(region);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(r, n)| (r.to_string(), *n)).collect()
    }

    #[test]
    fn the_local_region_comes_first_then_the_preference_then_the_rest_by_name() {
        let regions = running(&[("syd", 1), ("ams", 2), ("iad", 1), ("fra", 0), ("ord", 3)]);
        let prefer = vec!["ord".to_string(), "nrt".to_string(), "ams".to_string()];
        assert_eq!(
            order_regions(&regions, "iad", &prefer),
            vec!["iad", "ord", "ams", "syd"],
            "fra has nothing started; nrt runs nothing"
        );
        assert_eq!(
            order_regions(&regions, "lhr", &[]),
            vec!["ams", "iad", "ord", "syd"]
        );
        assert!(order_regions(&running(&[("ams", 0)]), "ams", &[]).is_empty());
    }
}
