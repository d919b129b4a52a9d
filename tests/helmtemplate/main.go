// Command helmtemplate renders a Helm chart's templates the way `helm template` does, for
// machines without a helm binary: Go's text/template with Sprig v3 and Helm's toYaml,
// include and required, values from values.yaml merged with a JSON object of overrides
// (numbers as float64, as Helm reads them), missing values rendered empty. It knows only
// what the explaind chart uses; a function it lacks fails the parse, and a .Release or
// .Chart field it lacks fails the render, so neither can pass silently.
//
//	helmtemplate CHART_DIR '{"startupSeconds": 5}'
//
// prints each template's output after "# Source: NAME", or the error and exits 1.
package main

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	sprig "github.com/Masterminds/sprig"
	"gopkg.in/yaml.v2"
)

func main() {
	if len(os.Args) != 3 {
		fail(fmt.Errorf("usage: helmtemplate CHART_DIR OVERRIDES_JSON"))
	}
	chart := os.Args[1]
	values := readYAML(filepath.Join(chart, "values.yaml"))
	var overrides map[string]interface{}
	if err := json.Unmarshal([]byte(os.Args[2]), &overrides); err != nil {
		fail(fmt.Errorf("overrides: %w", err))
	}
	merge(values, overrides)
	meta := readYAML(filepath.Join(chart, "Chart.yaml"))
	context := map[string]interface{}{
		"Values":  values,
		"Release": release{Name: "release", Namespace: "default", Service: "Helm", Revision: 1, IsInstall: true},
		"Chart":   chartMetadata{Name: fmt.Sprint(meta["name"]), Version: fmt.Sprint(meta["version"]), AppVersion: fmt.Sprint(meta["appVersion"])},
	}
	functions := sprig.TxtFuncMap()
	functions["toYaml"] = func(v interface{}) string {
		data, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(data), "\n")
	}
	var templates *template.Template
	functions["include"] = func(name string, data interface{}) (string, error) {
		var out strings.Builder
		err := templates.ExecuteTemplate(&out, name, data)
		return out.String(), err
	}
	functions["required"] = func(message string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf(message)
		}
		return v, nil
	}
	// Like Helm: every file under templates/ is parsed into one set (so partials can be
	// included), and each whose name does not start with "_" is rendered, NOTES.txt aside.
	templates = template.New("").Funcs(functions).Option("missingkey=zero")
	var rendered []string
	root := filepath.Join(chart, "templates")
	err := filepath.WalkDir(root, func(path string, entry fs.DirEntry, err error) error {
		if err != nil || entry.IsDir() {
			return err
		}
		text, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		name, _ := filepath.Rel(root, path)
		if _, err := templates.New(name).Parse(string(text)); err != nil {
			return err
		}
		if !strings.HasPrefix(entry.Name(), "_") && entry.Name() != "NOTES.txt" {
			rendered = append(rendered, name)
		}
		return nil
	})
	if err != nil {
		fail(err)
	}
	sort.Strings(rendered)
	for _, name := range rendered {
		var out strings.Builder
		if err := templates.ExecuteTemplate(&out, name, context); err != nil {
			fail(err)
		}
		fmt.Printf("---\n# Source: %s\n%s\n", name, strings.ReplaceAll(out.String(), "<no value>", ""))
	}
}

// release and chartMetadata are the .Release and .Chart fields Helm gives a template; a
// misspelt field is an error, as in Helm.
type release struct {
	Name, Namespace, Service string
	Revision                 int
	IsInstall, IsUpgrade     bool
}

type chartMetadata struct {
	Name, Version, AppVersion string
}

// readYAML reads a YAML mapping as JSON would hold it (string keys, float64 numbers).
func readYAML(path string) map[string]interface{} {
	text, err := os.ReadFile(path)
	if err != nil {
		fail(err)
	}
	var raw interface{}
	if err := yaml.Unmarshal(text, &raw); err != nil {
		fail(fmt.Errorf("%s: %w", path, err))
	}
	encoded, err := json.Marshal(stringKeys(raw))
	if err != nil {
		fail(err)
	}
	values := map[string]interface{}{}
	if err := json.Unmarshal(encoded, &values); err != nil {
		fail(err)
	}
	return values
}

func stringKeys(v interface{}) interface{} {
	switch node := v.(type) {
	case map[interface{}]interface{}:
		out := map[string]interface{}{}
		for key, value := range node {
			out[fmt.Sprint(key)] = stringKeys(value)
		}
		return out
	case []interface{}:
		for i, value := range node {
			node[i] = stringKeys(value)
		}
	}
	return v
}

// merge sets overrides into values as helm --set-json does: mappings present in both merge
// key by key, and a null deletes the key.
func merge(values, overrides map[string]interface{}) {
	for key, value := range overrides {
		inner, isMap := value.(map[string]interface{})
		existing, wasMap := values[key].(map[string]interface{})
		switch {
		case value == nil:
			delete(values, key)
		case isMap && wasMap:
			merge(existing, inner)
		default:
			values[key] = value
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "Error:", err)
	os.Exit(1)
}
