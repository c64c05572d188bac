//! Lenient building blocks for reading undocumented payloads: each wrapper accepts any JSON
//! value; the expected kind is read, anything else is skipped (without allocating) and read as
//! absent, so an odd type in an undocumented payload never fails the whole delivery. They all
//! drive serde_json through `deserialize_any`.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Generates the visitor methods that skip a value of the wrong kind and yield `Default`.
macro_rules! skip_other_kinds {
    ($($method:ident($ty:ty)),*) => {
        $(fn $method<E: de::Error>(self, _: $ty) -> Result<Self::Value, E> {
            Ok(Default::default())
        })*
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A string (or a number, rendered as a string: ids are opaque); `None` for anything else.
#[derive(Debug, Default)]
pub(super) struct OptStr(pub(super) Option<String>);

impl<'de> Deserialize<'de> for OptStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OptStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<OptStr, E> {
                Ok(OptStr(Some(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<OptStr, E> {
                Ok(OptStr(Some(s)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<OptStr, E> {
                Ok(OptStr(Some(n.to_string())))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<OptStr, E> {
                Ok(OptStr(Some(n.to_string())))
            }
            skip_other_kinds!(visit_bool(bool), visit_f64(f64));
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<OptStr, A::Error> {
                skip_map(map).map(|()| OptStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<OptStr, A::Error> {
                skip_seq(seq).map(|()| OptStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A boolean; `None` for anything else.
#[derive(Debug, Default)]
pub(super) struct OptBool(pub(super) Option<bool>);

impl<'de> Deserialize<'de> for OptBool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OptBool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
                Ok(OptBool(Some(b)))
            }
            skip_other_kinds!(
                visit_str(&str),
                visit_i64(i64),
                visit_u64(u64),
                visit_f64(f64)
            );
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| OptBool(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| OptBool(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON object read as `T` (a struct of lenient fields); `None` for anything else.
#[derive(Debug)]
pub(super) struct Obj<T>(pub(super) Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|t| Obj(Some(t)))
            }
            skip_other_kinds!(
                visit_str(&str),
                visit_bool(bool),
                visit_i64(i64),
                visit_u64(u64),
                visit_f64(f64)
            );
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Obj<T>, A::Error> {
                skip_seq(seq).map(|()| Obj(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The first entry of a JSON object as (key, value), the rest skipped; `None` for an empty
/// object or anything else. Used for the v2 `projects` map, keyed by project id.
#[derive(Debug)]
pub(super) struct FirstEntry<T>(pub(super) Option<(String, T)>);

impl<T> Default for FirstEntry<T> {
    fn default() -> Self {
        FirstEntry(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for FirstEntry<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = FirstEntry<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstEntry<T>, A::Error> {
                let first = map.next_entry::<String, T>()?;
                skip_map(map).map(|()| FirstEntry(first))
            }
            skip_other_kinds!(
                visit_str(&str),
                visit_bool(bool),
                visit_i64(i64),
                visit_u64(u64),
                visit_f64(f64)
            );
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<FirstEntry<T>, A::Error> {
                skip_seq(seq).map(|()| FirstEntry(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// An object of which only `id` matters (`project`, `dataRow`, `label`, ...).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct IdOnly {
    pub(super) id: OptStr,
}

/// Every element of a JSON array, each read leniently as `T`; empty for anything else.
#[derive(Debug)]
pub(super) struct Many<T>(pub(super) Vec<T>);

impl<T> Default for Many<T> {
    fn default() -> Self {
        Many(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Many<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Many<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Many<T>, A::Error> {
                let mut all = Vec::new();
                while let Some(item) = seq.next_element::<T>()? {
                    all.push(item);
                }
                Ok(Many(all))
            }
            skip_other_kinds!(
                visit_str(&str),
                visit_bool(bool),
                visit_i64(i64),
                visit_u64(u64),
                visit_f64(f64)
            );
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Many<T>, A::Error> {
                skip_map(map).map(|()| Many(Vec::new()))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}
