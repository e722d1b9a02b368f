//! Parsing request bodies as OpenAI does: malformed JSON (or invalid UTF-8)
//! is 400, a body with wrong types or missing fields is 422 naming the
//! field; bodies over [`MAX_BODY_BYTES`] are refused (413) before parsing.

use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Parses a JSON body, classifying failures as OpenAI does.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::InvalidRequest {
            message: "the request body is not valid UTF-8".into(),
            param: None,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_data() {
            ApiError::Unprocessable(if path == "." {
                flattened_field_error(bytes).unwrap_or_else(|| inner.to_string())
            } else {
                format!("{path}: {inner}")
            })
        } else {
            syntax_error(&inner)
        }
    })?;
    de.end().map_err(|e| syntax_error(&e))?;
    Ok(value)
}

/// Serde loses the path of errors inside `#[serde(flatten)]` fields; the
/// shared sampling fields are parsed once more on their own to name it.
fn flattened_field_error(bytes: &[u8]) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, super::types::SamplingFields>(&mut de) {
        Err(err) => {
            let path = err.path().to_string();
            (path != ".").then(|| format!("{path}: {}", err.into_inner()))
        }
        Ok(_) => None,
    }
}

fn syntax_error(err: &serde_json::Error) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("the request body is not valid JSON: {err}"),
        param: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::ChatCompletionRequest;

    #[test]
    fn classifies_bad_bodies() {
        let syntax = parse::<ChatCompletionRequest>(b"{not json").unwrap_err();
        assert_eq!(syntax.status(), 400);
        let utf8 = parse::<ChatCompletionRequest>(b"{\"model\": \"\xff\"}").unwrap_err();
        assert_eq!(utf8.status(), 400);
        let missing = parse::<ChatCompletionRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(missing.status(), 422);
        assert!(missing.to_string().contains("messages"), "{missing}");
        let wrong = parse::<ChatCompletionRequest>(
            br#"{"model": "m", "messages": [], "max_tokens": "ten"}"#,
        )
        .unwrap_err();
        assert_eq!(wrong.status(), 422);
        assert!(wrong.to_string().contains("max_tokens"), "{wrong}");
        let trailing =
            parse::<ChatCompletionRequest>(br#"{"model": "m", "messages": []} x"#).unwrap_err();
        assert_eq!(trailing.status(), 400);
    }
}
