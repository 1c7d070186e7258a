package l4smtp

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"testing"
)

// chunkReader hands out its data in pieces of the given sizes, as a TCP
// connection may.
type chunkReader struct {
	data  []byte
	sizes []int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := len(c.data)
	if len(c.sizes) > 0 {
		n = min(n, c.sizes[0])
		c.sizes = c.sizes[1:]
	}
	n = copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

type readLine struct {
	line    string
	tooLong bool
}

func readAllLines(rd io.Reader) []readLine {
	lr := newLineReader(rd)
	var got []readLine
	for {
		line, tooLong, err := lr.readLine()
		if err != nil {
			return got
		}
		got = append(got, readLine{string(line), tooLong})
	}
}

// referenceLines is what readLine must return, written the obvious way.
func referenceLines(data []byte) []readLine {
	var want []readLine
	for {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			return want
		}
		line := bytes.TrimSuffix(data[:i], []byte("\r"))
		data = data[i+1:]
		if len(line)+2 > maxCommandLine {
			want = append(want, readLine{"", true})
		} else {
			want = append(want, readLine{string(line), false})
		}
	}
}

func TestLineReader(t *testing.T) {
	inputs := []string{
		"EHLO a\r\nNOOP\r\n",
		"NOOP\nRSET\r\n\r\n\n",
		"partial line without end",
		strings.Repeat("x", 510) + "\r\n" + strings.Repeat("y", 511) + "\r\nNOOP\r\n",
		strings.Repeat("z", 100*1024) + "\r\nQUIT\r\n",
		"a\rb\r\n\r\r\n",
	}
	for i, in := range inputs {
		for _, size := range []int{1, 2, 7, 511, 512, 513, 4096} {
			t.Run(fmt.Sprintf("%d/%d", i, size), func(t *testing.T) {
				sizes := make([]int, len(in))
				for j := range sizes {
					sizes[j] = size
				}
				got := readAllLines(&chunkReader{data: []byte(in), sizes: sizes})
				want := referenceLines([]byte(in))
				if fmt.Sprint(got) != fmt.Sprint(want) {
					t.Fatalf("got %+v\nwant %+v", got, want)
				}
			})
		}
	}
}

// FuzzCommandReader checks the command line reader against the obvious
// implementation, whatever the input and however it is split.
func FuzzCommandReader(f *testing.F) {
	f.Add([]byte("EHLO a\r\nSTARTTLS\r\n"), uint16(3))
	f.Add([]byte(strings.Repeat("A", 600)+"\nNOOP\n"), uint16(100))
	f.Add([]byte("\r\n\r\n\x00\xff\r\n"), uint16(1))
	f.Fuzz(func(t *testing.T, data []byte, step uint16) {
		var sizes []int
		for s := int(step%600) + 1; len(sizes) < len(data); s = s*31%600 + 1 {
			sizes = append(sizes, s)
		}
		got := readAllLines(&chunkReader{data: data, sizes: sizes})
		want := referenceLines(data)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("got %+v\nwant %+v", got, want)
		}
	})
}
