//! The store's schemas, parsed: the key codec, a codec per registered value schema, and the
//! reader schema values are resolved to.

use std::collections::HashMap;

use rialto_protocol::avro::{AvroCodec, AvroError};
use rialto_protocol::meta::{StoreRecord, ValueSchema};
use rialto_protocol::schema_compat::can_read;

use crate::ReaderSchema;

/// The parsed schemas of the store.
pub(crate) struct Codecs {
    key_schema: String,
    value_schemas: Vec<ValueSchema>,
    /// Codec of the key schema.
    pub(crate) key: AvroCodec,
    /// Codecs of the value schemas, by id.
    pub(crate) values: HashMap<u32, AvroCodec>,
    /// The schema values are returned in, and its id when it is a registered one.
    reader: Option<(Option<u32>, AvroCodec)>,
}

impl Codecs {
    /// Parses the store's schemas; an unparsable value schema is skipped with a warning (values
    /// written with it then fail to decode), an unparsable key schema is an error, and so is a
    /// reader schema that is not registered (by id) or cannot read a registered schema.
    pub(crate) fn from_record(
        record: &StoreRecord,
        reader: &ReaderSchema,
    ) -> Result<Codecs, AvroError> {
        let key = AvroCodec::parse(&record.key_schema)?;
        let mut values = HashMap::with_capacity(record.value_schemas.len());
        for schema in &record.value_schemas {
            match AvroCodec::parse(&schema.schema) {
                Ok(codec) => {
                    values.insert(schema.id, codec);
                }
                Err(e) => {
                    tracing::warn!(store = record.name, id = schema.id, error = %e, "skipping unparsable value schema")
                }
            }
        }
        let reader = match reader {
            ReaderSchema::Latest => record
                .latest_value_schema()
                .and_then(|s| Some((Some(s.id), values.get(&s.id)?.clone()))),
            ReaderSchema::Id(id) => {
                let codec = values.get(id).ok_or_else(|| {
                    AvroError::Schema(format!(
                        "reader schema {id} is not a registered value schema of store `{}`",
                        record.name
                    ))
                })?;
                Some((Some(*id), codec.clone()))
            }
            ReaderSchema::Schema(text) => {
                let codec = AvroCodec::parse(text)?;
                for (id, writer) in &values {
                    can_read(writer.schema(), codec.schema()).map_err(|e| {
                        AvroError::Schema(format!(
                            "the reader schema cannot read values written with value schema \
                             {id} of store `{}`: {e}",
                            record.name
                        ))
                    })?;
                }
                let id = values
                    .iter()
                    .find(|(_, c)| c.schema() == codec.schema())
                    .map(|(id, _)| *id);
                Some((id, codec))
            }
        };
        Ok(Codecs {
            key_schema: record.key_schema.clone(),
            value_schemas: record.value_schemas.clone(),
            key,
            values,
            reader,
        })
    }

    /// Decodes a stored value with the schema it was written with.
    pub(crate) fn decode_value(
        &self,
        store: &str,
        raw: &crate::RawValue,
    ) -> Result<rialto_protocol::avro::Value, crate::ClientError> {
        let codec = self
            .values
            .get(&raw.schema_id)
            .ok_or_else(|| AvroError::Decode {
                what: "value",
                detail: format!(
                "value schema id {} is not registered for store `{store}` in this client; if the \
                 schema was just added, retry in a moment, otherwise check the store's schemas \
                 with `rialto-admin`",
                raw.schema_id
            ),
            })?;
        match &self.reader {
            Some((Some(id), _)) if *id == raw.schema_id => Ok(codec.decode(&raw.bytes, "value")?),
            Some((_, reader)) => Ok(codec.decode_as(&raw.bytes, reader, "value")?),
            None => Ok(codec.decode(&raw.bytes, "value")?),
        }
    }

    /// The reader schema's id and codec, for a compute request (which names a registered
    /// schema the servers resolve values to).
    pub(crate) fn reader_for_compute(
        &self,
        store: &str,
    ) -> Result<(u32, AvroCodec), crate::ClientError> {
        match &self.reader {
            Some((Some(id), codec)) => Ok((*id, codec.clone())),
            Some((None, _)) => Err(crate::ClientError::Compute(format!(
                "the client's reader schema is not registered for store `{store}`; compute \
                 needs a registered one (`rialto-admin schemas add`)"
            ))),
            None => Err(crate::ClientError::Compute(format!(
                "store `{store}` has no value schema"
            ))),
        }
    }

    pub(crate) fn matches(&self, record: &StoreRecord) -> bool {
        self.key_schema == record.key_schema && self.value_schemas == record.value_schemas
    }
}
